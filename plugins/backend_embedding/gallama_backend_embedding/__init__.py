"""Embedding backend for gallama."""

__version__ = "0.1.0"
