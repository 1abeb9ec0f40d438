"""Artifact mode for gallama (distribution ``gallama-feature-artifact``, entry point ``artifact``).

See :mod:`gallama_feature_artifact.plugin` for the modes and the README of the package for the wire format.
"""

from .transformer import ArtifactTransformer

__all__ = ["ArtifactTransformer"]
