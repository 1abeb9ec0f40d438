"""A tiny model folder that llguidance and the settings code can read: no weights, no GPU."""

from __future__ import annotations

import json
from pathlib import Path

END = "<|im_end|>"


def byte_level_alphabet() -> list[str]:
    """The 256 characters a byte-level BPE uses for the bytes 0..255 (printable bytes stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tokenizer_json(merges: list[tuple[str, str]]) -> dict:
    """A byte-level BPE ``tokenizer.json``: the 256 byte tokens, ``merges`` in order, then ``<|im_end|>``."""
    vocab = {ch: i for i, ch in enumerate(byte_level_alphabet())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": len(vocab), "content": END, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "pre_tokenizer": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}


MERGES = [("t", "r"), ("u", "e"), ("tr", "ue"), ("f", "a"), ("l", "s"), ("ls", "e"), ("fa", "lse")]
N_VOCAB = 256 + len(MERGES) + 1
END_ID = N_VOCAB - 1


def make_folder(path: Path) -> Path:
    """Write a model folder into ``path``: config.json, tokenizer.json, tokenizer_config.json, an empty
    safetensors file."""
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                  "max_position_embeddings": 8192}))
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(MERGES)))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": END, "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    (path / "model.safetensors").write_bytes(b"")
    return path


TINY_LLAMA = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048}


def make_tiny_llama(path: Path, seed: int = 0, context: int | None = None) -> Path:
    """A model folder exllamav2 can load: a 2-layer Llama with random FP16 weights (~1 MB) on the byte-level
    tokenizer above, for GPU tests on machines that cannot download a model. Its text is noise; what it checks
    is the plumbing: loading, generation, grammar masks, stop strings, cache reuse, concurrency.

    ``context``: its ``max_position_embeddings`` (default 2048). The byte-level tokenizer spends about one token
    per byte, so prompts that carry tool schemas or a feature's instructions need a longer one."""
    import numpy as np
    from safetensors.numpy import save_file

    make_folder(path)
    c = TINY_LLAMA
    hidden, inner, heads, kv_heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], \
        c["num_key_value_heads"]
    head_dim = hidden // heads
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": N_VOCAB, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
        "bos_token_id": END_ID, "eos_token_id": END_ID, **c,
        "max_position_embeddings": context or c["max_position_embeddings"]}))
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    tensors = {"model.embed_tokens.weight": weight(N_VOCAB, hidden), "lm_head.weight": weight(N_VOCAB, hidden),
               "model.norm.weight": np.ones(hidden, dtype=np.float16)}
    for layer in range(c["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors.update({
            prefix + "input_layernorm.weight": np.ones(hidden, dtype=np.float16),
            prefix + "post_attention_layernorm.weight": np.ones(hidden, dtype=np.float16),
            prefix + "self_attn.q_proj.weight": weight(heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": weight(hidden, heads * head_dim),
            prefix + "mlp.gate_proj.weight": weight(inner, hidden),
            prefix + "mlp.up_proj.weight": weight(inner, hidden),
            prefix + "mlp.down_proj.weight": weight(hidden, inner)})
    save_file(tensors, str(path / "model.safetensors"))
    return path
