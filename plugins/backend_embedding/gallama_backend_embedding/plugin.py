"""Entry point: registers the ``embedding`` backend (torch and infinity-emb load only with a model)."""

from gallama_kernel import hookimpl


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    from .backend import EmbeddingBackend

    register("embedding", EmbeddingBackend)
