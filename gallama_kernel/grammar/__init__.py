"""Constraints as grammars: Lark is the kernel's grammar language (see :mod:`.core`)."""

from .core import ANY_TEXT, Grammar, GrammarBuilder, GrammarError, literal, not_starting_with, user_grammar
from .gbnf import to_gbnf

__all__ = ["ANY_TEXT", "Grammar", "GrammarBuilder", "GrammarError", "literal", "not_starting_with", "to_gbnf",
           "user_grammar"]
