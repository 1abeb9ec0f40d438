"""Texts a grammar writes as one special token of the model's vocabulary (a tool-call marker)."""

from __future__ import annotations

from gallama_kernel.grammar.core import GrammarBuilder, literal


def test_a_special_text_is_a_token_for_a_vocabulary_that_has_it_and_text_otherwise() -> None:
    builder = GrammarBuilder()
    marker = builder.special_token("[TOOL_CALLS]")
    assert builder.special_token("[TOOL_CALLS]") == marker  # one rule per text
    grammar = builder.build(f'{marker} {literal("ok")}')
    assert grammar.special == ((marker, "[TOOL_CALLS]"),)
    assert grammar.matches("[TOOL_CALLS]ok")  # the read-back parses the text
    assert f"\n{marker}: <[5]>\n" in grammar.for_vocabulary(lambda text: 5)
    assert grammar.for_vocabulary(lambda text: None) == grammar.llguidance
