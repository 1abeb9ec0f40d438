"""gallama's ``remote`` backend: a model served by another engine over HTTP, under gallama's semantics."""
