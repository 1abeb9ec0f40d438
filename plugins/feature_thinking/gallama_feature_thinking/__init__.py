"""Thinking templates for gallama: the model thinks by filling in an XML template, then answers.

See :mod:`gallama_feature_thinking.plugin` for the request fields and how a request is served.
"""

__version__ = "0.1.0"
