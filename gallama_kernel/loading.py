"""Loading models in a process, shared by ``gallama`` commands and the gateway's worker processes: the plugin host
for a plugin selection, and the models of some specs on their backends.

A selection is the command line's ``--plugins`` / ``--disable-plugin`` on top of the settings
(``GALLAMA_PLUGINS``, ``GALLAMA_DISABLE_PLUGINS``); ``gallama run`` hands its selection to every worker on the
worker's command line (:meth:`PluginSelection.argv`), so a worker loads the plugins the gateway was told to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .config import ConfigError, ModelSpec, Settings, check_backend_keys
from .plugins import PluginHost, create_host

console = Console(stderr=True)


@dataclass(frozen=True)
class PluginSelection:
    """Plugins to load (comma-separated names; ``None``: all) and to leave out, beyond the settings' own."""

    allow: str | None = None
    deny: str | None = None

    def argv(self) -> list[str]:
        """The worker command-line options that carry this selection."""
        return [*(["--plugins", self.allow] if self.allow else []),
                *(["--disable-plugins", self.deny] if self.deny else [])]


def selected_host(allow: str | None = None, deny: str | None = None) -> PluginHost:
    """The plugin host: ``allow`` replaces the settings' allowlist when given, ``deny`` adds to their blocklist."""
    settings = Settings()
    deny_list = ",".join(filter(None, [deny or "", settings.disable_plugins or ""]))
    return create_host(allow=allow or settings.plugins, deny=deny_list)


def load_models(specs: list[ModelSpec], host: PluginHost, quiet: bool = False) -> Any:
    """Load ``specs`` in this process (rich progress bars on stderr unless ``quiet``); a backend that is not
    registered is a :class:`ConfigError` naming the plugins that failed to load."""
    from .pipeline.models import ModelRegistry, ServedModel

    registry = ModelRegistry()
    backends = host.backends
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=quiet) as progress:
        for spec in specs:
            if spec.backend not in backends:
                failed = [f"{r.name}: {r.error}" for r in host.summaries() if r.status == "failed"]
                hint = f"; plugins that failed to load: {'; '.join(failed)}" if failed else ""
                raise ConfigError(f"model '{spec.name}': backend '{spec.backend}' is not available "
                                  f"(registered: {', '.join(sorted(backends)) or 'none'}){hint}")
            spec = check_backend_keys(spec, backends[spec.backend], f"model '{spec.name}'")
            task = progress.add_task(f"loading {spec.name} ({spec.backend})", total=1.0)
            backend = backends[spec.backend](spec)
            backend.load(lambda fraction, task=task: progress.update(task, completed=fraction))
            progress.update(task, completed=1.0)
            registry.add(ServedModel(spec.name, backend, aliases=spec.aliases))
    return registry
