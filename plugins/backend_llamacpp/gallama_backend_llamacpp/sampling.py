"""Per-request llama.cpp sampler chains."""

from __future__ import annotations

import random

import llama_cpp as ll

from gallama_kernel.plugin import SamplingParams

PENALTY_WINDOW = 64


def build_chain(params: SamplingParams, n_vocab: int) -> ll.llama_sampler_p:
    """A sampler chain for one request: penalties → top-k → top-p → min-p → temperature → draw.

    ``temperature == 0`` is greedy. The chain is owned by the caller (``llama_sampler_free``).
    """
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    add = ll.llama_sampler_chain_add
    if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        add(chain, ll.llama_sampler_init_penalties(n_vocab, PENALTY_WINDOW, params.repeat_penalty,
                                                   params.frequency_penalty, params.presence_penalty))
    if params.temperature <= 0:
        add(chain, ll.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(chain, ll.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0:
        add(chain, ll.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, ll.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain
