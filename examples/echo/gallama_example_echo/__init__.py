"""An example third-party gallama backend: ``echo`` answers with the last user message, needing no model file.

It shows the backend contract end to end: ``register_backends`` names the class; the class declares the model keys
it takes (``spec_keys`` of the kernel's, ``options_model`` of its own) so that a wrong ``-id`` key is refused
before loading; it tokenizes (UTF-8 bytes, ChatML's markers as control tokens that client text can never produce),
streams events honouring ``max_tokens``, stop strings, cancellation and ``emit_interval_s``, and refuses output
constraints (the default ``validate_grammar``), because it cannot enforce them.

Serve it: ``gallama run -id "model_id=package:gallama_example_echo backend=echo model_name=echo prefix='echo: '"``.
"""

from __future__ import annotations

from typing import Any

from gallama_kernel.plugin import hookimpl

from .backend import EchoBackend, EchoOptions

__all__ = ["EchoBackend", "EchoOptions"]


@hookimpl
def register_backends(register: Any) -> None:
    register("echo", EchoBackend)
