"""What a ModelSpec and a request mean for ExLlamaV2 (no exllamav2 needed)."""

from __future__ import annotations

import json

import pytest
from exllama_folder import END, END_ID, N_VOCAB, make_tiny_llama

from gallama_backend_exllama.settings import (
    TokenizerFiles,
    model_folder,
    plan_load,
    sampler_fields,
    trained_context,
)
from gallama_kernel.backend import BackendError, SamplingParams
from gallama_kernel.config import ModelSpec


def spec(**keys) -> ModelSpec:
    return ModelSpec(model_id="m", backend="exllama", **keys)


def test_model_folder_is_checked(folder, tmp_path_factory):
    assert model_folder(str(folder)) == folder
    with pytest.raises(BackendError, match="not a folder"):
        model_folder(str(folder / "config.json"))
    empty = tmp_path_factory.mktemp("empty")
    (empty / "config.json").write_text("{}")
    with pytest.raises(BackendError, match=r"lacks tokenizer\.json, \*\.safetensors"):
        model_folder(str(empty))
    with pytest.raises(BackendError, match="no model folder"):
        model_folder(None)


def test_trained_context_reads_config_as_exllamav2_does(folder):
    assert trained_context(folder) == 8192
    (folder / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    assert trained_context(folder) == 4096
    (folder / "config.json").write_text("{}")
    assert trained_context(folder) == 2048
    (folder / "config.json").write_text("[1]")
    with pytest.raises(BackendError, match="not a JSON object"):
        trained_context(folder)


def test_default_plan():
    plan = plan_load(spec(), 131072)
    assert (plan.max_seq_len, plan.cache_tokens, plan.max_batch_size) == (32768, 32768, 8)
    assert plan.cache_class == "ExLlamaV2Cache" and plan.gpu_split is None and not plan.tensor_parallel
    assert plan_load(spec(), 8192).max_seq_len == 8192


def test_cache_size_and_max_seq_len():
    plan = plan_load(spec(cache_size=20000, max_concurrent_requests=3), 8192)
    assert (plan.max_seq_len, plan.cache_tokens, plan.max_batch_size) == (8192, 20224, 3)  # pages of 256
    assert plan_load(spec(cache_size=1000), 8192).max_seq_len == 1000  # a small cache bounds the default
    with pytest.raises(BackendError, match="cannot hold one request"):
        plan_load(spec(cache_size=1000, max_seq_len=2000), 8192)
    with pytest.raises(BackendError, match="exceeds the model's context"):
        plan_load(spec(max_seq_len=9000), 8192)


@pytest.mark.parametrize(("quant", "cls"), [("FP16", "ExLlamaV2Cache"), ("Q8", "ExLlamaV2Cache_Q8"),
                                            ("q6", "ExLlamaV2Cache_Q6"), ("Q4", "ExLlamaV2Cache_Q4")])
def test_cache_quant(quant, cls):
    assert plan_load(spec(cache_quant=quant), 4096).cache_class == cls


def test_gpus_tp_draft_and_refusals():
    plan = plan_load(spec(gpus="20,24", tp="true"), 4096)
    assert plan.gpu_split == [20.0, 24.0] and plan.tensor_parallel
    with pytest.raises(BackendError, match="positive number of GB"):
        plan_load(spec(gpus="0,24"), 4096)
    with pytest.raises(BackendError, match="n_threads is a CPU setting"):
        plan_load(spec(n_threads=4), 4096)
    ngram = plan_load(spec(draft_model_id="prompt_lookup"), 4096)
    assert ngram.ngram_draft and ngram.draft_path is None
    assert plan_load(spec(draft_model_id="small"), 4096, draft_path="/m/small").draft_path == "/m/small"
    with pytest.raises(BackendError, match="no ExLlamaV2 model folder"):
        plan_load(spec(draft_model_id="small"), 4096)
    with pytest.raises(BackendError, match="tp=true with a draft model"):
        plan_load(spec(draft_model_id="prompt_lookup", tp="true"), 4096)


def test_sampler_fields_are_openai_defaults_not_exllamav2s():
    greedy = sampler_fields(SamplingParams(temperature=0))
    assert greedy["top_k"] == 1 and greedy["temperature"] == 1.0 and greedy["token_repetition_penalty"] == 1.0
    free = sampler_fields(SamplingParams(temperature=0.7))
    assert (free["temperature"], free["top_k"], free["top_p"], free["min_p"]) == (0.7, 0, 0.0, 0.0)
    tuned = sampler_fields(SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1,
                                          presence_penalty=0.5, frequency_penalty=0.25))
    assert (tuned["top_k"], tuned["top_p"], tuned["min_p"]) == (40, 0.9, 0.05)
    assert (tuned["token_repetition_penalty"], tuned["token_presence_penalty"],
            tuned["token_frequency_penalty"], tuned["token_repetition_range"]) == (1.1, 0.5, 0.25, 64)


def test_template_and_special_tokens(folder):
    files = TokenizerFiles(folder)
    assert files.chat_template() == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert files.special_token_text("bos_token") == "<s>" and files.special_token_text("eos_token") == END
    assert not files.adds_bos()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}], "add_bos_token": True}))
    files = TokenizerFiles(folder)
    assert files.chat_template() == "D" and files.adds_bos()
    (folder / "chat_template.jinja").write_text("J")
    assert TokenizerFiles(folder).chat_template() == "J"


def test_end_tokens(folder):
    specials = TokenizerFiles(folder).special_tokens()
    assert specials == {END: END_ID}
    assert TokenizerFiles(folder).end_token_ids(5) == [5, END_ID]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 5, True]}))
    assert TokenizerFiles(folder).end_token_ids(5) == [5, 7, END_ID]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": END_ID}))
    assert TokenizerFiles(folder).end_token_ids(None) == [END_ID]


def test_the_tiny_gpu_test_model_is_a_loadable_folder(tmp_path):
    from safetensors.numpy import load_file

    folder = make_tiny_llama(tmp_path)
    assert model_folder(str(folder)) == folder and trained_context(folder) == 2048
    weights = load_file(str(folder / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (N_VOCAB, 256) and len(weights) == 3 + 2 * 9
    assert plan_load(spec(max_seq_len=2048), trained_context(folder)).cache_tokens == 2048
