"""The llguidance mask the exllama filter applies, on a real llguidance tokenizer (no GPU needed)."""

from __future__ import annotations

import pytest
import torch
from exllama_folder import END_ID, N_VOCAB

from gallama_backend_exllama.guidance import GuidanceMask, tokenizer_for
from gallama_backend_exllama.settings import TokenizerFiles
from gallama_kernel.backend import BackendError
from gallama_kernel.grammar import Grammar, GrammarError
from gallama_kernel.grammar.matchers import MatcherCache

BOOLEAN = Grammar('start: "true" | "false"', 'start: "true" | "false"', "a boolean")


@pytest.fixture
def grammars(folder) -> MatcherCache:
    return MatcherCache(tokenizer_for(TokenizerFiles(folder), [END_ID]))


def test_tokenizer_from_the_folders_tokenizer_json(grammars):
    assert grammars.tokenizer.vocab_size == N_VOCAB
    assert grammars.tokenizer.eos_tokens == [END_ID]
    assert grammars.tokenizer.tokenize_str("true") == [258]  # the merged token, as exllamav2 would encode it


def test_unreadable_tokenizer_is_a_load_time_refusal(folder):
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(BackendError, match="cannot enforce grammars"):
        tokenizer_for(TokenizerFiles(folder), [0])


def test_mask_allows_exactly_the_grammar_then_only_the_end(grammars):
    mask = GuidanceMask(grammars.matcher(BOOLEAN), N_VOCAB, [END_ID])
    mask.fill()
    allowed = set(mask.allowed_ids())
    assert {ord("t"), ord("f"), 258} <= allowed and ord("x") not in allowed and END_ID not in allowed
    logits = torch.zeros(N_VOCAB + 24)  # exllamav2 pads the logits row past the vocabulary
    mask.apply(logits)
    assert torch.isinf(logits[ord("x")]) and logits[258] == 0 and torch.isinf(logits[N_VOCAB:]).all()
    mask.feed(258)  # "true"
    assert mask.finished and mask.error is None
    mask.fill()
    assert mask.allowed_ids() == [END_ID]
    mask.feed(END_ID)  # exllamav2 also feeds the token that ends the job: ignored
    assert mask.error is None


def test_refused_token_is_an_error_and_leaves_only_the_end(grammars):
    mask = GuidanceMask(grammars.matcher(BOOLEAN), N_VOCAB, [END_ID])
    mask.feed(ord("x"))
    assert mask.finished and mask.error
    mask.fill()
    assert mask.allowed_ids() == [END_ID]


def test_end_token_in_the_last_bit_of_a_word(grammars):
    mask = GuidanceMask(grammars.matcher(BOOLEAN), 64, [31, 63, 200])  # 200 is outside this vocabulary
    mask.feed(ord("x"))
    mask.fill()
    assert mask.allowed_ids() == [31, 63]


def test_broken_grammar_is_a_400(grammars):
    with pytest.raises(GrammarError, match="cannot be enforced"):
        grammars.validate(Grammar("start: x", "start: x", "a broken grammar"))
