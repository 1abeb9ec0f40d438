"""``gallama keys add|list|revoke``: manage the API keys of ``GALLAMA_HOME_PATH/keys.json``.

The file and its format are described in :mod:`gallama_kernel.keys`. A running server rereads the file within
a second, so these commands take effect without a restart. ``add`` prints the new key on stdout, alone, and
everything else on stderr, so ``KEY=$(gallama keys add laptop)`` captures just the key.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any, NoReturn

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import ConfigError, Settings
from .keys import AmbiguousKeyError, KeyFile, UnknownKeyError, env_principals

console = Console(stderr=True)


def _key_file() -> KeyFile:
    return KeyFile(Settings().home)


def _environment_keys() -> tuple[str | None, str | None]:
    """``GALLAMA_API_KEYS`` and ``GALLAMA_ADMIN_KEY`` as the server reads them."""
    settings = Settings()
    api_keys = settings.api_keys
    return api_keys, settings.admin_key


def _fail(message: str, code: int) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    sys.exit(code)


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


@click.group("keys")
def keys_group() -> None:
    """Manage API keys (GALLAMA_HOME_PATH/keys.json); a running server picks up changes within a second.

    Inference keys may call the model endpoints; admin keys (--admin) may also manage models and downloads.
    GALLAMA_API_KEYS (comma separated, inference) and GALLAMA_ADMIN_KEY also grant access.
    """


@keys_group.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An admin key (model management, downloads); it may also do inference.")
@click.option("--model", "models", multiple=True, metavar="MODEL",
              help="A model the key may use (repeatable; default: every model).")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, metavar="N",
              help="Most requests of this key in flight at once (default: no limit).")
@click.option("--tokens-per-minute", type=click.IntRange(min=1), default=None, metavar="N",
              help="Most tokens (prompt + completion) this key may use in any 60 seconds (default: no limit).")
def add_command(name: str, admin: bool, models: tuple[str, ...], max_concurrent: int | None,
                tokens_per_minute: int | None) -> None:
    """Create a key named NAME (a label: letters, digits, '.', '_', '-') and print it once."""
    key_file = _key_file()
    try:
        key, record = key_file.add(name, admin=admin, models=models or None, max_concurrent=max_concurrent,
                                   tokens_per_minute=tokens_per_minute)
    except (ConfigError, OSError) as error:
        _fail(str(error), 2)
    click.echo(key)
    models_shown = ", ".join(record.models) if record.models is not None else "all models"
    console.print(f"created {record.id} ({escape(record.name)}: {record.scope}, {escape(models_shown)}, "
                  f"max_concurrent {_limit(record.max_concurrent)}, tokens_per_minute "
                  f"{_limit(record.tokens_per_minute)}) in {escape(str(key_file.path))}", highlight=False,
                  soft_wrap=True)
    console.print("[yellow]note:[/yellow] the key above is shown only now and cannot be shown again: store it. "
                  f"Revoke it with: gallama keys revoke {record.id}", highlight=False, soft_wrap=True)


def _rows(key_file: KeyFile) -> list[dict[str, Any]]:
    api_keys, admin_key = _environment_keys()
    rows: list[dict[str, Any]] = []
    for principal, _key in env_principals(api_keys, admin_key):
        rows.append({"id": principal.key_id, "name": principal.name, "scope": principal.scope, "models": None,
                     "max_concurrent": None, "tokens_per_minute": None, "created": None, "source": "environment"})
    rows.extend({**record.public(), "source": "file"} for record in key_file.read())
    return rows


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(as_json: bool) -> None:
    """Every key that grants access: id, name, scope, models, quotas, created (never a key or its hash)."""
    key_file = _key_file()
    try:
        rows = _rows(key_file)
    except ConfigError as error:
        _fail(str(error), 2)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:  # only the note below: an empty table says nothing
        _say_no_keys(key_file)
        return
    table = Table(title=f"{key_file.path}", box=box.SIMPLE_HEAD, caption="created: UTC")
    table.add_column("id", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("scope", no_wrap=True)
    table.add_column("models", overflow="fold")
    table.add_column("limits", overflow="fold")
    table.add_column("created", no_wrap=True)
    for row in rows:
        created = (datetime.datetime.fromtimestamp(row["created"], datetime.UTC).strftime("%Y-%m-%d %H:%M")
                   if row["created"] is not None else "environment")
        models = ", ".join(row["models"]) if row["models"] is not None else "all"
        limits = [f"{row['max_concurrent']} concurrent" if row["max_concurrent"] is not None else "",
                  f"{row['tokens_per_minute']} tokens/min" if row["tokens_per_minute"] is not None else ""]
        table.add_row(escape(row["id"]), escape(row["name"]) if row["source"] == "file" else "", row["scope"],
                      escape(models), ", ".join(filter(None, limits)) or "none", created)
    Console().print(table)


def _say_no_keys(key_file: KeyFile) -> None:
    if key_file.exists():
        console.print(f"no keys: requests are refused while {escape(str(key_file.path))} exists (add a key with: "
                      "gallama keys add NAME, or delete the file to serve without keys)", highlight=False,
                      soft_wrap=True)
    else:
        console.print("no keys: the server accepts requests without a key (add one with: gallama keys add NAME)")


@keys_group.command("revoke")
@click.argument("id_or_name", metavar="ID_OR_NAME")
def revoke_command(id_or_name: str) -> None:
    """Remove the key with this id, or the one key with this name."""
    if id_or_name.startswith("env:"):
        variable = id_or_name.removeprefix("env:").partition("[")[0]
        _fail(f"{id_or_name} comes from the environment: remove it from {variable} and restart the server", 1)
    key_file = _key_file()
    try:
        gone = key_file.revoke(id_or_name)
    except AmbiguousKeyError as error:
        _fail(str(error), 1)
    except UnknownKeyError as error:
        _fail(f"{error} (see: gallama keys list)", 1)
    except (ConfigError, OSError) as error:
        _fail(str(error), 2)
    console.print(f"revoked {gone.id} ({escape(gone.name)})", highlight=False)
    if not key_file.read():
        api_keys, admin_key = _environment_keys()
        if not env_principals(api_keys, admin_key):
            console.print(f"[yellow]note:[/yellow] no keys are left, and requests still need one while "
                          f"{escape(str(key_file.path))} exists; delete that file to serve without keys",
                          highlight=False, soft_wrap=True)
