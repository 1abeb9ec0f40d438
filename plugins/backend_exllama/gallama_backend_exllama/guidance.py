"""Grammar enforcement for ExLlamaV2: llguidance's token mask, applied through an exllamav2 filter.

llguidance reads the model's ``tokenizer.json`` (the same file exllamav2 tokenizes with), so its token ids are
the model's. Per request, a :class:`GuidanceMask` owns a fresh matcher: exllamav2 feeds it every sampled token
and asks for the next mask while the GPU computes the next step (the filter's background worker); the mask sets
every token the grammar does not allow to ``-inf`` before sampling. Once the grammar is complete only the end
tokens remain, and the job ends on one of them, so a constrained output ends exactly where the grammar does, as
on the llama.cpp backend. A matcher error (a token the grammar refused, which the mask makes impossible unless
something upstream overrode it) also leaves only the end tokens and is reported: the request fails rather than
continuing unconstrained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

from gallama_kernel.plugin import BackendError

from .settings import TokenizerFiles

if TYPE_CHECKING:
    import torch


def tokenizer_for(files: TokenizerFiles, end_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's tokenizer of the model folder's ``tokenizer.json``; ``end_ids`` end a constrained output."""
    try:
        return llguidance.LLTokenizer(files.tokenizer_text, eos_token=end_ids or None)
    except (ValueError, RuntimeError) as error:
        raise BackendError(f"{files.folder / 'tokenizer.json'}: llguidance cannot read it ({error}); this model "
                           "cannot enforce grammars") from None


class GuidanceMask:
    """One request's matcher and its next-token mask over ``n_vocab`` tokens (ids beyond are never allowed).

    ``end_ids``: the tokens that end the job; they are the only ones allowed once the matcher has stopped or
    failed. Not thread-safe, and it need not be: exllamav2 never overlaps feed and mask of one filter.
    """

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int, end_ids: list[int]) -> None:
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.end_ids = [t for t in end_ids if 0 <= t < n_vocab]
        self.bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._bytes = self.bits.view(np.uint8)
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        """No grammar token may follow: the matcher stopped or failed."""
        return self.error is not None or self.matcher.is_stopped()

    def feed(self, token: int) -> None:
        """Advance over a sampled token. After the end, further tokens (the end token itself) are ignored."""
        if self.finished:
            return
        if not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or f"the grammar refused token {token}"

    def fill(self) -> None:
        """Compute the mask of the next token into :attr:`bits`."""
        if not self.finished:
            self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
            if self.matcher.is_error():
                self.error = self.matcher.get_error() or "the grammar matcher failed"
        if self.finished:
            self.bits[:] = 0
            for token in self.end_ids:  # bit i of the little-endian words: bit i % 8 of byte i // 8
                self._bytes[token // 8] |= 1 << (token % 8)

    def allowed(self) -> np.ndarray:
        """Boolean array over ``n_vocab`` tokens: which the last :meth:`fill` allows."""
        return np.unpackbits(self._bytes, count=self.n_vocab, bitorder="little").astype(bool)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the disallowed entries of a 1-D CPU float32 logits row to ``-inf``, in place; returned."""
        row = logits.numpy()
        row[: self.n_vocab][~self.allowed()] = -np.inf
        row[self.n_vocab:] = -np.inf
        return logits

    def allowed_ids(self) -> list[int]:
        """The allowed token ids, ascending (exllamav2's list form of a filter's pass tokens)."""
        return np.flatnonzero(self.allowed()).tolist()


def filter_class() -> type:
    """exllamav2's filter for a :class:`GuidanceMask` (built on first use: importing exllamav2 needs CUDA).

    Mask mode (``can_mask_logits`` and ``use_background_worker``): exllamav2 calls ``prepare_logit_mask`` on
    its filter pool while the next forward pass runs, then ``mask_logits`` on the row it samples from.
    """
    from exllamav2.generator.filters import ExLlamaV2Filter

    class GuidanceFilter(ExLlamaV2Filter):  # type: ignore[misc,valid-type]
        def __init__(self, model: Any, tokenizer: Any, mask: GuidanceMask) -> None:
            super().__init__(model, tokenizer)
            self.mask = mask

        def begin(self, prefix_str: str) -> None:  # a fresh matcher per job: nothing to reset
            pass

        def feed(self, token: Any) -> None:
            self.mask.feed(int(token.item()) if hasattr(token, "item") else int(token))

        def next(self) -> tuple[list[int], list[int]]:
            self.mask.fill()
            return self.mask.allowed_ids(), []

        def use_background_worker(self) -> bool:
            return True

        def can_mask_logits(self) -> bool:
            return True

        def prepare_logit_mask(self) -> bool:
            self.mask.fill()
            return True

        def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
            return self.mask.apply(logits)

    return GuidanceFilter
