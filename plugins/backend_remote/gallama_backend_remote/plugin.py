"""Entry point: registers the ``remote`` backend (httpx loads only with a model)."""

from gallama_kernel import hookimpl


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    from .backend import RemoteBackend

    register("remote", RemoteBackend)
