"""What a ModelSpec and a request mean for ExLlamaV2 (no exllamav2 needed)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from exllama_folder import END, END_ID, N_VOCAB, make_tiny_llama

from gallama_backend_exllama.backend import ExLlamaBackend
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


def test_draft_keys_in_the_plan():
    plan = plan_load(spec(draft_model_id="small", draft_model_name="tiny", draft_gpus="4,2.5", draft_cache_quant="q4",
                          draft_cache_size=4096), 4096, draft_path="/m/small")
    assert (plan.draft_name, plan.draft_gpu_split, plan.draft_cache_class) == ("tiny", [4.0, 2.5], "ExLlamaV2Cache_Q4")
    assert plan.cache_class == "ExLlamaV2Cache" and plan.gpu_split is None  # the model's own are untouched
    default = plan_load(spec(draft_model_id="small", gpus="20,24", cache_quant="Q8"), 4096, draft_path="/m/small")
    assert (default.draft_name, default.draft_gpu_split, default.draft_cache_class) == (
        "small", [20.0, 24.0], "ExLlamaV2Cache")
    assert plan_load(spec(draft_model_id="small", draft_cache_quant="Q6"), 4096,
                     draft_path="/m/small").draft_cache_class == "ExLlamaV2Cache_Q6"
    for size in (1000, 1024):  # the same pages as cache_size=1000: the generator sees equal caches
        assert plan_load(spec(draft_model_id="small", cache_size=1000, draft_cache_size=size), 4096,
                         draft_path="/m/small").cache_tokens == 1024
    ngram = plan_load(spec(draft_model_id="prompt_lookup", draft_model_name="ngrams"), 4096)
    assert ngram.ngram_draft and ngram.draft_name == "ngrams"
    assert plan_load(spec(), 4096).draft_name is None


@pytest.mark.parametrize(("keys", "message"), [
    ({"cache_size": 1000, "draft_cache_size": 2048},
     r"draft_cache_size=2048: exllamav2's dynamic generator needs the draft cache the size of the model's cache "
     r"\(1024 tokens"),
    ({"draft_cache_size": 512}, r"the size of the model's cache \(4096 tokens.*set draft_cache_size to 4096"),
    ({"draft_gpus": "0,2"}, "draft_gpus=0.0,2.0: every GPU needs a positive number of GB"),
    ({"draft_model_id": None, "draft_model_name": "tiny"},
     "draft_model_name given without draft_model_id: the exllama backend"),
    ({"draft_model_id": None, "draft_cache_quant": "Q4"}, "draft_cache_quant given without draft_model_id"),
    ({"draft_model_id": "prompt_lookup", "draft_cache_size": 4096},
     "draft_cache_size given with draft_model_id=prompt_lookup, which loads no draft model: the exllama backend"),
    ({"draft_model_id": "prompt_lookup", "draft_gpus": "4"}, "draft_gpus given with draft_model_id=prompt_lookup"),
    ({"draft_model_id": "prompt_lookup", "draft_cache_quant": "Q8"},
     "draft_cache_quant given with draft_model_id=prompt_lookup"),
])
def test_draft_keys_it_cannot_apply_are_refused(keys, message):
    keys = {"draft_model_id": "small", **keys}
    with pytest.raises(BackendError, match=message):
        plan_load(spec(**keys), 4096, draft_path=None if keys["draft_model_id"] in (None, "prompt_lookup")
                  else "/m/small")


class FakeExLlama:
    """The parts of exllamav2 that ``ExLlamaBackend._load_model`` calls, recording how each model and cache is
    made."""

    def __init__(self) -> None:
        self.made: list[tuple[str, dict]] = []
        made = self.made

        class Config:
            def __init__(self, path: str) -> None:
                self.path = path

            def arch_compat_overrides(self, quiet: bool) -> None:
                pass

        class Model:
            def __init__(self, config: Config) -> None:
                self.config = config

            def load(self, gpu_split, callback) -> None:
                made.append(("load", {"folder": self.config.path, "gpu_split": gpu_split}))

            def load_autosplit(self, cache, callback) -> None:
                made.append(("load_autosplit", {"folder": self.config.path}))

        def cache(name: str) -> type:
            def init(self, model, max_seq_len: int, lazy: bool = False) -> None:
                made.append((name, {"folder": model.config.path, "max_seq_len": max_seq_len}))
            return type(name, (), {"__init__": init})

        self.exl = SimpleNamespace(ExLlamaV2Config=Config, ExLlamaV2=Model, ExLlamaV2Tokenizer=lambda config: None,
                                   **{name: cache(name) for name in ("ExLlamaV2Cache", "ExLlamaV2Cache_Q8",
                                                                     "ExLlamaV2Cache_Q6", "ExLlamaV2Cache_Q4")})


def test_the_draft_model_is_loaded_as_the_plan_says():
    plan = plan_load(spec(draft_model_id="small", gpus="20", cache_quant="Q8", draft_gpus="3",
                          draft_cache_quant="Q4"), 4096, draft_path="/m/small")
    fake = FakeExLlama()
    backend = ExLlamaBackend(spec())
    backend._load_model(fake.exl, Path("/m/main"), plan, None)
    backend._load_model(fake.exl, Path("/m/small"), plan, None, draft=True)
    assert fake.made == [("load", {"folder": "/m/main", "gpu_split": [20.0]}),
                         ("ExLlamaV2Cache_Q8", {"folder": "/m/main", "max_seq_len": 4096}),
                         ("load", {"folder": "/m/small", "gpu_split": [3.0]}),
                         ("ExLlamaV2Cache_Q4", {"folder": "/m/small", "max_seq_len": 4096})]
    autosplit = FakeExLlama()
    backend._load_model(autosplit.exl, Path("/m/small"), plan_load(spec(draft_model_id="small"), 4096,
                                                                   draft_path="/m/small"), None, draft=True)
    assert autosplit.made == [("ExLlamaV2Cache", {"folder": "/m/small", "max_seq_len": 4096}),
                              ("load_autosplit", {"folder": "/m/small"})]


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
