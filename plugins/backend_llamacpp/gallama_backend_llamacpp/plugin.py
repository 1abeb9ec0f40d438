"""Entry point: registers the ``llama_cpp`` backend."""

from gallama_kernel import hookimpl


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    from .backend import LlamaCppBackend

    register("llama_cpp", LlamaCppBackend)
