"""gallama kernel: the public API that plugins import."""

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "gallama"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for plugin hook implementations: ``@hookimpl def register_backends(register): ...``."""

__all__ = ["PROJECT_NAME", "__version__", "hookimpl"]
