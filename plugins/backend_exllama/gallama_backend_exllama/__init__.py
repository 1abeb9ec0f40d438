"""ExLlamaV2 backend for gallama."""

__version__ = "0.1.0"
