"""Entry point: registers the ``exllama`` backend (exllamav2, torch and CUDA load only with a model)."""

from gallama_kernel import hookimpl


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    from .backend import ExLlamaBackend

    register("exllama", ExLlamaBackend)
