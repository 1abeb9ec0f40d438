"""The ``gallama`` command: run, plugins, and whatever plugins add through ``register_commands``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from . import __version__
from .config import (
    CONFIG_FILE,
    DEFAULT_ENTRY,
    DEFAULT_MODEL_NAME,
    ConfigError,
    ModelSpec,
    Settings,
    build_spec,
    load_model_config,
    parse_id_string,
    resolve_model_path,
)
from .keys_cli import keys_group
from .loading import selected_host
from .plugins import PluginHost

console = Console(stderr=True)


def _host(allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> PluginHost:
    return selected_host(",".join(allow) or None, ",".join(deny) or None)


def resolve_specs(settings: Settings, name: str | None, ids: tuple[str, ...],
                  backends: dict[str, Any] | None = None) -> list[ModelSpec]:
    """The specs ``gallama run`` serves, checked against their backends' declared keys when ``backends`` (the
    registered backend classes) is given."""
    config = load_model_config(settings.home)
    if ids:
        return [build_spec(parse_id_string(text), config, f"-id {text!r}", backends) for text in ids]
    if name:
        return [build_spec({"model_id": name}, config, f"model '{name}'", backends)]
    if DEFAULT_MODEL_NAME not in config:
        config = {**config, DEFAULT_MODEL_NAME: DEFAULT_ENTRY}
    return [build_spec({"model_id": DEFAULT_MODEL_NAME}, config, "default model", backends)]


def _say_who_may_call(store: Any, bind_host: str) -> None:
    """At start: whether keys protect the server, and a warning when an open server listens beyond loopback."""
    import ipaddress

    try:
        loopback = bind_host == "localhost" or ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = False
    if store.inference_configured:
        console.print("keys: inference and administration need an API key", highlight=False)
        return
    if store.configured:
        console.print("keys: administration needs the admin key; inference is open (no inference key is set)",
                      highlight=False)
    else:
        console.print("keys: none configured, so the server is open to every client that can reach it",
                      highlight=False)
    if not loopback:
        console.print(f"[bold yellow]warning:[/bold yellow] listening on {escape(bind_host)} without an inference "
                      "key: anyone who can reach this address can use the models"
                      + ("" if store.configured else " and manage them")
                      + ". Set GALLAMA_API_KEYS or create keys with 'gallama keys add NAME'.", highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gallama")
def cli() -> None:
    """gallama: an OpenAI-compatible server for local agentic work."""


@cli.command()
@click.argument("model", required=False)
@click.option("-id", "ids", multiple=True, metavar='"model_id=… key=value …"',
              help="A model to serve, as key=value pairs (repeatable).")
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port (default 8000).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, engine logs included.")
@click.option("--plugins", "allow", multiple=True, help="Load only these plugins (repeatable).")
@click.option("--disable-plugin", "deny", multiple=True, help="Do not load this plugin (repeatable).")
@click.option("--cors-origin", "cors", multiple=True, metavar="ORIGIN",
              help="Allow cross-site requests from ORIGIN, e.g. http://localhost:3000 (repeatable; "
                   "GALLAMA_CORS_ORIGINS). Default: none.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log lines as text (default) or one JSON object per line (GALLAMA_LOG_FORMAT).")
def run(model: str | None, ids: tuple[str, ...], host: str | None, port: int | None, verbose: bool,
        allow: tuple[str, ...], deny: tuple[str, ...], cors: tuple[str, ...], log_format: str | None) -> None:
    """Serve MODEL (an entry of model_config.yaml), the -id models, or the embedded default model.

    -id keys: model_id, model_name, backend, aliases, plus the keys the chosen backend declares ('gallama plugins'
    lists each backend's keys; a wrong key is refused with the list).

    One gateway on HOST:PORT routes requests by model name to one worker process per model (the same model
    given twice: two replicas, balanced by outstanding requests). Models can be added and removed at run time
    (POST /add_model, /remove_model). Keys: GALLAMA_API_KEYS, GALLAMA_ADMIN_KEY and 'gallama keys'.
    """
    import uvicorn

    from .gateway.access import Access
    from .gateway.app import create_gateway
    from .gateway.http import HeadDeadlineH11
    from .gateway.pool import Pool
    from .keys import KeyStore
    from .loading import PluginSelection
    from .logformat import configure
    from .protocol.limits import CLIENT_KEEP_ALIVE_S, MAX_HEADER_BYTES

    settings = Settings()
    json_logs = (log_format or settings.log_format) == "json"
    configure(logging.DEBUG if verbose else logging.INFO, json_logs)
    plugins = _host(allow, deny)
    try:
        specs = resolve_specs(settings, model, ids, plugins.backends)
    except ConfigError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        sys.exit(2)
    worker_env = {"GALLAMA_WORKER_VERBOSE": "1" if verbose else "0"}
    selection = PluginSelection(",".join(allow) or None, ",".join(deny) or None)  # passed to every worker

    def show(worker: Any, state: str) -> None:
        detail = f" ({worker.error})" if worker.error and state in ("failed", "restarting") else ""
        console.print(f"{worker.spec.name} replica {worker.replica}: {state}{detail}")

    bind_host, bind_port = host or settings.host, port or settings.port
    address = f"http://{bind_host}:{bind_port}"

    def ready(groups: list[Any]) -> None:
        served = ", ".join(g.name + (f" (aliases: {', '.join(g.aliases)})" if g.aliases else "") for g in groups)
        console.print(f"[green]ready:[/green] {address}/v1 serves {escape(served)}", highlight=False, soft_wrap=True)

    store = KeyStore(settings.home, settings.api_keys, settings.admin_key)
    origins = [*cors, *(o.strip() for o in (settings.cors_origins or "").split(",") if o.strip())]
    _say_who_may_call(store, bind_host)
    pool = Pool(worker_env, on_state=show, plugins=selection, routing=settings.routing)
    app = create_gateway(pool, settings.home, Access(store), initial=specs, on_ready=ready,
                         max_queue=settings.max_queue, cors_origins=origins, host=plugins)
    console.print(f"gateway on {address}; loading {', '.join(s.name for s in specs)}", highlight=False,
                  soft_wrap=True)
    # h11, not httptools: h11 caps a request head (h11_max_incomplete_event_size; larger: 400 and closed), while
    # uvicorn's httptools protocol buffers any number of header bytes. Idle keep-alive connections close after
    # CLIENT_KEEP_ALIVE_S; bodies are bounded in read_json (size, time); on shutdown, open streams get
    # STREAM_SHUTDOWN_GRACE_S (< timeout_graceful_shutdown), then end with an error event
    config = uvicorn.Config(app, host=bind_host, port=bind_port, log_level="debug" if verbose else "info",
                            log_config=None, access_log=False,  # the gateway logs each request itself
                            timeout_graceful_shutdown=5, timeout_keep_alive=CLIENT_KEEP_ALIVE_S,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            http=HeadDeadlineH11)  # request heads within HEADER_TIMEOUT_S (slow clients)

    class GatewayServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            app.state.gateway.begin_shutdown()  # streams end with an error event, not a silent cut
            await super().shutdown(sockets)

    server = GatewayServer(config)
    server.run()
    if not server.started:
        console.print("[red]error:[/red] the gateway did not start (see the messages above)")
        sys.exit(2)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_command(as_json: bool) -> None:
    """List plugins: name, version, hooks, and every error (loading, and each registration hook)."""
    from .gateway.app import check_plugin_routes

    host = _host()
    host.run_registrations()
    check_plugin_routes(host, Settings().home)  # routes the gateway would not relay are errors too
    records = host.summaries()
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in records], indent=2))
        return
    table = Table(title="gallama plugins")
    for column in ("name", "version", "status", "hooks", "error"):
        table.add_column(column)
    for r in records:
        style = {"failed": "red", "disabled": "dim"}.get(r.status, "")
        table.add_row(r.name, r.version or "", r.status, ", ".join(r.hooks), r.error or "", style=style)
    Console().print(table)
    for r in records:
        for backend, keys in r.backends.items():
            own = ", ".join(_describe_option(name, option) for name, option in keys["options"].items())
            Console().print(f"[bold]backend {escape(backend)}[/bold] ({escape(r.name)}): model keys "
                            f"{escape(', '.join(keys['keys']))}" + (f"; its own: {escape(own)}" if own else ""),
                            highlight=False, soft_wrap=True)


def _describe_option(name: str, option: dict[str, Any]) -> str:
    default = "required" if option["required"] else f"default {option['default']!r}"
    return f"{name} ({option['type']}, {default})"


def _registration_failures(host: PluginHost) -> str:
    failed = [f"{r.name}: {r.error}" for r in host.summaries() if r.failed_in("register_models")]
    return f"\nPlugins whose models were refused: {'; '.join(failed)}" if failed else ""


def _exit_on_interrupt() -> Any:
    """Make Ctrl-C end a download at once, returning the previous SIGINT handler (``None``: not installed).

    A KeyboardInterrupt would only reach the command after huggingface_hub's download threads finish the files
    they are on; the partial files they leave are resumed by the next run, so exiting now loses nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupted(_signum: int, _frame: Any) -> None:
        console.print("[yellow]interrupted:[/yellow] run the same command again to resume the download")
        sys.stderr.flush()
        os._exit(130)

    return signal.signal(signal.SIGINT, interrupted)


@cli.command("download")
@click.argument("model", metavar="NAME[:QUANT]")
@click.option("--backend", default=None, metavar="BACKEND",
              help="exllama (default), llama_cpp (where a GGUF exists), or another backend the model lists "
                   "(gallama list available).")
def download_command(model: str, backend: str | None) -> None:
    """Download NAME at quantization QUANT from the Hugging Face hub and add it to model_config.yaml.

    Files go to GALLAMA_HOME_PATH/models/<name>-<quant>-<backend>/; the entry NAME points at them, so
    `gallama run NAME` serves the model. Without :QUANT the model's default quantization is used. An interrupted
    download resumes when the same command runs again.
    """
    from .catalog import CatalogError, load_catalog, split_reference
    from .download import DownloadError, fetch, human_size, register

    settings = Settings()
    host = _host()
    name, quant = split_reference(model)
    try:
        item = load_catalog(host).resolve(name, quant, backend.lower() if backend else None)
    except CatalogError as error:
        console.print(f"[red]error:[/red] {escape(str(error) + _registration_failures(host))}")
        sys.exit(2)
    console.print(f"downloading [bold]{escape(item.model)}[/bold] {item.quant} ({item.backend}) from "
                  f"{escape(item.source)}", highlight=False)
    previous = _exit_on_interrupt()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    try:
        try:
            with Progress(*columns, console=console, transient=False) as bars:
                task = bars.add_task(f"{item.model} {item.quant}", total=None)
                result = fetch(item, settings.home,
                               lambda done, total: bars.update(task, completed=done, total=total))
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        config_file = register(settings.home, result)
    except ConfigError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        sys.exit(2)
    except DownloadError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        sys.exit(1)
    console.print(f"[green]done:[/green] {escape(str(result.model_path))} ({human_size(result.size)}); "
                  f"entry '{escape(item.model)}' written to {escape(str(config_file))}", highlight=False)
    if item.backend not in host.backends:
        console.print(f"[yellow]note:[/yellow] no '{escape(item.backend)}' backend is installed (registered: "
                      f"{escape(', '.join(sorted(host.backends)) or 'none')}); install its plugin to serve it")
    console.print(f"serve it: gallama run {escape(item.model)}", highlight=False)


@cli.group("list")
def list_group() -> None:
    """List models: the catalog (available) or what model_config.yaml holds (downloaded)."""


@list_group.command("available")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_available(as_json: bool) -> None:
    """Models `gallama download NAME:QUANT` knows, with their backends and quantizations."""
    from .catalog import load_catalog

    host = _host()
    catalog = load_catalog(host)
    if as_json:
        click.echo(json.dumps([model.as_dict() for model in catalog], indent=2))
        return
    table = Table(title="gallama download NAME:QUANT [--backend BACKEND]")
    table.add_column("model", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    table.add_column("quantizations")
    table.add_column("default", no_wrap=True)
    notes = []
    for model in catalog:
        for index, backend in enumerate(model.backends):
            default = ""
            if backend == model.default_backend:
                default = model.default_quant
            table.add_row(escape(model.name) if index == 0 else "", escape(backend), ", ".join(model.quants(backend)),
                          default, end_section=index == len(model.backends) - 1)
        if model.note:
            notes.append(f"{escape(model.name)}: {escape(model.note)}")
    out = Console()
    out.print(table)
    for note in notes:
        out.print(f"note: {note}")
    failures = _registration_failures(host)
    if failures:
        console.print(f"[yellow]warning:[/yellow] {escape(failures.strip())}")


@list_group.command("downloaded")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_downloaded(as_json: bool) -> None:
    """The entries of model_config.yaml, with the path each one resolves to and its size on disk."""
    from .download import MODELS_DIR, disk_usage, human_size

    home = Settings().home
    try:
        config = load_model_config(home) if (home / CONFIG_FILE).exists() else {}
    except ConfigError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        sys.exit(2)
    models_root = (home / MODELS_DIR).resolve()
    rows: list[dict[str, Any]] = []
    for name, entry in config.items():
        model_id = str(entry.get("model_id", ""))
        row: dict[str, Any] = {"name": name, "backend": str(entry.get("backend", ModelSpec.model_fields["backend"]
                                                                       .default)),
                               "model_id": model_id, "path": None, "size_bytes": None, "downloaded": False,
                               "error": None}
        try:
            path = Path(resolve_model_path(model_id)).resolve()
            row.update(path=str(path), size_bytes=disk_usage(path), downloaded=path.is_relative_to(models_root))
        except (ConfigError, OSError) as error:
            row["error"] = str(error)
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{home / CONFIG_FILE}")
    for column in ("name", "backend", "size", "path"):
        table.add_column(column, no_wrap=column != "path")
    for row in rows:
        size = human_size(row["size_bytes"]) if row["size_bytes"] is not None else "missing"
        where = row["path"] or f"{row['model_id']}: {row['error']}"
        table.add_row(escape(row["name"]), escape(row["backend"]), size, escape(where),
                      style="" if row["path"] else "red")
    Console().print(table)


cli.add_command(keys_group)


def main() -> None:
    try:
        _host().call_each("register_commands", cli=cli)
    except Exception as error:  # the built-in commands must work even if plugin discovery fails
        console.print(f"[yellow]warning:[/yellow] plugin commands unavailable: {error}")
    cli()


if __name__ == "__main__":
    main()
