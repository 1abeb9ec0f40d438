"""The model catalog (integrity of the shipped data, resolution, refusals) and the `download` / `list` commands
that need no hub: listings, unknown names, and names that would write outside GALLAMA_HOME_PATH."""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from gallama_kernel import cli as gallama_cli
from gallama_kernel import hookimpl
from gallama_kernel.catalog import (
    CATALOG_RESOURCE,
    Catalog,
    CatalogError,
    builtin_catalog,
    load_catalog,
    parse_entry,
    parse_quant,
    split_reference,
)
from gallama_kernel.config import CONFIG_FILE, ConfigError, check_name, inside_home, save_model_entry
from gallama_kernel.download import human_size, model_path, target_folder
from gallama_kernel.plugins import PluginHost

ROOT = Path(__file__).parents[2]
ISSUE_MODELS = ["llama-3.1-8B", "llama-3.1-70B", "mistral", "mistral-large", "mistral-nemo", "codestral",
                "gemma-2-9B", "gemma-2-27B", "qwen-2-1.5B", "qwen-2-7B", "qwen-2-72B", "yi-1.5-34B", "qwen-2.5-72B",
                "qwen-2.5-32B", "qwen-2.5-14B", "qwen-2.5-7B", "multilingual-e5-large-instruct", "gte-large-en-v1.5"]


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (safe_load keeps the last silently)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key) for key, _ in node.value]
    twice = [key for key, count in Counter(map(str, keys)).items() if count > 1]
    assert not twice, f"{CATALOG_RESOURCE}: keys given twice: {twice} (line {node.start_mark.line + 1})"
    return loader.construct_mapping(node)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def catalog_text() -> str:
    return (ROOT / "gallama_kernel" / CATALOG_RESOURCE).read_text()


# -- integrity of the shipped catalog ------------------------------------------------------------------------

def test_catalog_has_every_model_of_the_issue() -> None:
    assert list(builtin_catalog().models) == ISSUE_MODELS


def test_catalog_has_no_key_twice() -> None:
    yaml.load(catalog_text(), Loader=UniqueKeyLoader)  # a SafeLoader subclass


def test_every_entry_resolves_to_a_repository_and_revision_or_file() -> None:
    catalog = builtin_catalog()
    sources: list[tuple[str, str, str | None]] = []
    folders: list[str] = []
    for model in catalog:
        assert model.backends, model.name
        for backend in model.backends:
            assert model.quants(backend), (model.name, backend)
            for quant in model.quants(backend):
                item = catalog.resolve(model.name, quant, backend)
                assert (item.model, item.quant, item.backend) == (model.name, quant, backend)
                owner, _, name = item.repo.partition("/")
                assert owner and name and "/" not in name, item
                assert item.revision and item.revision.strip() == item.revision, item
                if backend == "llama_cpp":
                    assert item.file and item.file.endswith(".gguf") and "/" not in item.file, item
                else:
                    assert item.file is None, item  # a whole branch / repository
                sources.append((item.repo, item.revision, item.file))
                folders.append(item.folder_name)
                check_name(item.folder_name)
    assert [s for s, n in Counter(sources).items() if n > 1] == [], "two labels point at the same download"
    assert len(set(folders)) == len(folders)


def test_every_quant_label_parses_to_itself() -> None:
    raw = yaml.safe_load(catalog_text())
    for name, entry in raw.items():
        assert parse_quant(entry["default_quant"]) == entry["default_quant"], name
        for backend, section in entry["backends"].items():
            for label in section["quants"]:
                assert isinstance(label, str), f"{name}.{backend}: quote the label {label!r}"
                assert parse_quant(label) == label, (name, backend, label)
                assert 1.0 <= float(label) <= 16.0


def test_kinds_backends_and_defaults() -> None:
    catalog = builtin_catalog()
    for model in catalog:
        default = catalog.resolve(model.name)
        assert (default.backend, default.quant) == (model.default_backend, model.default_quant)
        if model.kind == "embedding":
            assert model.backends == ["embedding"], model.name
        else:
            assert model.kind == "chat" and model.default_backend == "exllama", model.name
            assert set(model.backends) <= {"exllama", "llama_cpp"}, model.name
    assert catalog.resolve("qwen-2.5-7B", "4.0").source == "turboderp/Qwen2.5-7B-Instruct-exl2@4.0bpw"
    assert catalog.resolve("qwen-2.5-7B", "4.25").source == "bartowski/Qwen2.5-7B-Instruct-exl2@4_25"
    gguf = catalog.resolve("qwen-2.5-7B", "4.0", "llama_cpp")
    assert (gguf.repo, gguf.file) == ("bartowski/Qwen2.5-7B-Instruct-GGUF", "Qwen2.5-7B-Instruct-Q4_K_M.gguf")
    assert catalog.resolve("llama-3.1-8B", "4.0").source == "turboderp/Llama-3.1-8B-Instruct-exl2@4.0bpw"
    assert catalog.resolve("gte-large-en-v1.5").repo == "Alibaba-NLP/gte-large-en-v1.5"


def test_catalog_ships_as_package_data() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert CATALOG_RESOURCE in setuptools["package-data"]["gallama_kernel"]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("huggingface_hub") for d in dependencies)


# -- labels, references, resolution --------------------------------------------------------------------------

@pytest.mark.parametrize(("label", "canonical"), [("4", "4.0"), ("4.0", "4.0"), ("4.00", "4.0"), (4.25, "4.25"),
                                                  ("6.50", "6.5"), (8, "8.0"), (" 5.0 ", "5.0"), ("16.0", "16.0")])
def test_parse_quant(label: object, canonical: str) -> None:
    assert parse_quant(label) == canonical


@pytest.mark.parametrize("label", ["", "abc", "-1", "4.0bpw", "../4.0", "4/0", "1e3", True, None, "4.", ".5"])
def test_parse_quant_refuses(label: object) -> None:
    with pytest.raises(CatalogError):
        parse_quant(label)


def test_split_reference() -> None:
    assert split_reference("qwen-2.5-7B:4.0") == ("qwen-2.5-7B", "4.0")
    assert split_reference("qwen-2.5-7B") == ("qwen-2.5-7B", None)


def test_resolve_errors_list_what_exists() -> None:
    catalog = builtin_catalog()
    with pytest.raises(CatalogError, match=r"unknown model 'nope'.*qwen-2\.5-7B.*gte-large-en-v1\.5"):
        catalog.resolve("nope", "4.0")
    with pytest.raises(CatalogError, match=r"no quantization '4\.1' for backend 'exllama'.*4\.0, 4\.25.*llama_cpp"):
        catalog.resolve("qwen-2.5-7B", "4.1")
    with pytest.raises(CatalogError, match=r"no download for backend 'vllm'.*exllama \(.*llama_cpp \("):
        catalog.resolve("qwen-2.5-7B", "4.0", "vllm")
    with pytest.raises(CatalogError, match=r"no download for backend 'llama_cpp'.*exllama"):
        catalog.resolve("mistral-large", "4.0", "llama_cpp")
    with pytest.raises(CatalogError, match=r"give a quantization, one of 2\.0, 3\.0, 4\.0"):
        catalog.resolve("codestral", None, "llama_cpp")  # its default 4.25 is an exllama quantization


# -- malformed or dangerous entries ----------------------------------------------------------------------------

GOOD: dict[str, Any] = {"kind": "chat", "default_quant": "4.0",
                        "backends": {"llama_cpp": {"repo": "me/model-GGUF", "quants": {"4.0": {"file": "m.gguf"}}}}}


@pytest.mark.parametrize("name", ["../escape", "/abs/path", ".hidden", "a/b", "a\\b", "..", "", "x" * 101, "a b"])
def test_entry_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(CatalogError, match="refused"):
        parse_entry(name, GOOD)


@pytest.mark.parametrize(("change", "message"), [
    ({"file": "../../outside.gguf"}, "refused"),
    ({"file": "/etc/passwd"}, "refused"),
    ({"file": "dir/../../x.gguf"}, "refused"),
    ({"repo": "not a repo"}, "not a Hugging Face repository"),
    ({"repo": "../x/y"}, "not a Hugging Face repository"),
    ({"revision": 30}, "quote it"),
    ({"bogus": 1}, "unknown key"),
])
def test_malformed_quant_entries_are_refused(change: dict[str, Any], message: str) -> None:
    entry = {**GOOD, "backends": {"llama_cpp": {"repo": "me/model-GGUF", "quants": {"4.0": {"file": "m.gguf",
                                                                                             **change}}}}}
    with pytest.raises(CatalogError, match=message):
        parse_entry("mine", entry)


def test_malformed_entries_are_refused() -> None:
    with pytest.raises(CatalogError, match="kind"):
        parse_entry("mine", {**GOOD, "kind": "vision"})
    with pytest.raises(CatalogError, match="refused"):
        parse_entry("mine", {**GOOD, "backends": {"../b": GOOD["backends"]["llama_cpp"]}})
    with pytest.raises(CatalogError, match=r"default_quant 8\.0"):
        parse_entry("mine", {**GOOD, "default_quant": "8.0"})
    with pytest.raises(CatalogError, match="listed twice"):
        parse_entry("mine", {**GOOD, "backends": {"llama_cpp": {"repo": "me/m", "quants": {
            "4.0": {"file": "a.gguf"}, "4": {"file": "b.gguf"}}}}})
    catalog = Catalog()
    catalog.add("mine", GOOD)
    with pytest.raises(CatalogError, match="already in the catalog"):
        catalog.add("mine", GOOD)


# -- home: every path gallama writes stays inside it ----------------------------------------------------------

def test_target_folder_and_model_path(tmp_path: Path) -> None:
    item = builtin_catalog().resolve("qwen-2.5-7B", "4.0", "llama_cpp")
    folder = target_folder(tmp_path, item)
    assert folder == tmp_path.resolve() / "models" / "qwen-2.5-7B-4.0-llama_cpp"
    assert model_path(folder, item) == folder / "Qwen2.5-7B-Instruct-Q4_K_M.gguf"


def test_inside_home_refuses_escapes_and_outside_symlinks(tmp_path: Path) -> None:
    home, outside = tmp_path / "home", tmp_path / "outside"
    home.mkdir()
    outside.mkdir()
    assert inside_home(home, "models", "x") == home.resolve() / "models" / "x"
    for parts in (("..", "outside"), (str(outside),), ("models", "..", "..", "outside")):
        with pytest.raises(ConfigError, match="outside GALLAMA_HOME_PATH"):
            inside_home(home, *parts)
    (home / "models").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="outside GALLAMA_HOME_PATH"):
        inside_home(home, "models", "x")
    (home / "inner").mkdir()
    (home / "link").symlink_to(home / "inner", target_is_directory=True)
    assert inside_home(home, "link", "x") == home.resolve() / "link" / "x"  # a symlink that stays inside: fine


def test_save_model_entry(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / CONFIG_FILE).write_text("# my models\nmine:\n  model_id: /models/own.gguf  # my own file\n")
    save_model_entry(home, "qwen-2.5-7B", {"model_id": "/a", "backend": "exllama"})
    text = (home / CONFIG_FILE).read_text()
    assert text.startswith("# my models\nmine:\n  model_id: /models/own.gguf  # my own file\n"), "appended"
    save_model_entry(home, "mine", {"max_seq_len": 2048})
    assert yaml.safe_load((home / CONFIG_FILE).read_text()) == {
        "mine": {"model_id": "/models/own.gguf", "max_seq_len": 2048},
        "qwen-2.5-7B": {"model_id": "/a", "backend": "exllama"}}
    assert [p.name for p in home.iterdir()] == [CONFIG_FILE]  # no temporary file left
    for name in ("../x", "/etc/x", ".x", "a/b"):
        with pytest.raises(ConfigError, match="refused"):
            save_model_entry(home, name, {"model_id": "/a"})


def test_save_model_entry_refuses_a_config_symlinked_outside(tmp_path: Path) -> None:
    home, outside = tmp_path / "home", tmp_path / "elsewhere.yaml"
    home.mkdir()
    outside.write_text("other: {model_id: /x}\n")
    (home / CONFIG_FILE).symlink_to(outside)
    with pytest.raises(ConfigError, match="outside GALLAMA_HOME_PATH"):
        save_model_entry(home, "qwen-2.5-7B", {"model_id": "/a"})
    assert outside.read_text() == "other: {model_id: /x}\n"


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 999, 1500, 4_683_072_000, 2 * 10**12)] == [
        "0 B", "999 B", "1.5 kB", "4.7 GB", "2.0 TB"]


# -- the CLI without a hub -------------------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("GALLAMA_HOME_PATH", str(path))
    monkeypatch.setenv("COLUMNS", "200")
    return path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(gallama_cli.cli, list(args))


def test_list_available_table_and_json(home: Path) -> None:
    table = invoke("list", "available")
    assert table.exit_code == 0, table.output
    for name in ISSUE_MODELS:
        assert name in table.stdout
    assert "4.0, 4.25, 4.5" in table.stdout and "llama_cpp" in table.stdout and "embedding" in table.stdout
    listed = invoke("list", "available", "--json")
    assert listed.exit_code == 0, listed.output
    models = {m["model"]: m for m in json.loads(listed.stdout)}
    assert list(models) == ISSUE_MODELS
    qwen = models["qwen-2.5-7B"]
    assert (qwen["kind"], qwen["default_backend"], qwen["default_quant"]) == ("chat", "exllama", "4.0")
    assert {"quant": "4.0", "repo": "bartowski/Qwen2.5-7B-Instruct-GGUF", "revision": "main",
            "file": "Qwen2.5-7B-Instruct-Q4_K_M.gguf", "ignore": []} in qwen["backends"]["llama_cpp"]
    assert models["gte-large-en-v1.5"]["backends"]["embedding"][0]["quant"] == "16.0"
    assert not home.exists(), "listing the catalog writes nothing"


def test_list_downloaded_table_and_json(home: Path, tmp_path: Path) -> None:
    assert json.loads(invoke("list", "downloaded", "--json").stdout) == []
    assert not home.exists(), "listing writes nothing"
    own = tmp_path / "own.gguf"
    own.write_bytes(b"GGUF" + b"\0" * 1496)
    folder = home / "models" / "qwen-2.5-7B-4.0-exllama"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 2500)
    (home / CONFIG_FILE).write_text(yaml.safe_dump({
        "own": {"model_id": str(own), "backend": "llama_cpp"},
        "qwen-2.5-7B": {"model_id": str(folder), "backend": "exllama"},
        "gone": {"model_id": str(tmp_path / "deleted.gguf")}}))
    rows = {row["name"]: row for row in json.loads(invoke("list", "downloaded", "--json").stdout)}
    assert rows["own"] == {"name": "own", "backend": "llama_cpp", "model_id": str(own), "path": str(own.resolve()),
                           "size_bytes": 1500, "downloaded": False, "error": None}
    assert rows["qwen-2.5-7B"]["size_bytes"] == 2500 and rows["qwen-2.5-7B"]["downloaded"] is True
    assert rows["gone"]["path"] is None and "not found" in rows["gone"]["error"]
    assert rows["gone"]["backend"] == "llama_cpp"
    table = invoke("list", "downloaded")
    assert table.exit_code == 0, table.output
    assert "1.5 kB" in table.stdout and "2.5 kB" in table.stdout and "missing" in table.stdout
    assert str(folder.resolve()) in table.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["nope:4.0"], ["unknown model 'nope'", "qwen-2.5-7B", "gte-large-en-v1.5"]),
    (["../../etc:4.0"], ["unknown model '../../etc'"]),
    (["qwen-2.5-7B:4.1"], ["no quantization '4.1'", "4.0, 4.25"]),
    (["qwen-2.5-7B:../x"], ["no quantization '../x'"]),
    (["qwen-2.5-7B:4.0", "--backend", "vllm"], ["no download for backend 'vllm'", "exllama", "llama_cpp"]),
    (["mistral-large:4.0", "--backend", "llama_cpp"], ["no download for backend 'llama_cpp'", "exllama (2.3"]),
])
def test_download_unknown_name_quant_backend(home: Path, args: list[str], expected: list[str]) -> None:
    result = invoke("download", *args)
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    for text in expected:
        assert text in output
    assert not (home / "models").exists()


def test_download_refuses_a_folder_symlinked_outside(home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (home / "models").mkdir(parents=True)
    (home / "models" / "qwen-2.5-7B-4.0-exllama").symlink_to(outside, target_is_directory=True)
    result = invoke("download", "qwen-2.5-7B:4.0")
    assert result.exit_code == 2
    assert "outside GALLAMA_HOME_PATH" in " ".join(result.output.split())
    assert list(outside.iterdir()) == []
    assert not (home / CONFIG_FILE).exists()


def test_download_refuses_plugin_names_that_escape(home: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    class Sneaky:
        @hookimpl
        def register_models(self, register):
            register("../escape", GOOD)

    host = PluginHost()
    host.register(Sneaky(), "sneaky")
    monkeypatch.setattr(gallama_cli, "_host", lambda *args: host)
    result = invoke("download", "../escape:4.0", "--backend", "llama_cpp")
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "unknown model '../escape'" in output
    assert "sneaky: register_models" in output and "'../escape' is refused" in output
    assert host.records["sneaky"].status == "failed"
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the home


def test_load_catalog_keeps_the_good_entries_of_a_plugin() -> None:
    class Mixed:
        @hookimpl
        def register_models(self, register):
            register("mine", GOOD)
            register("qwen-2.5-7B", GOOD)  # taken by the built-in catalog: refused

    host = PluginHost()
    host.register(Mixed(), "mixed")
    catalog = load_catalog(host)
    assert catalog.models["mine"].plugin == "mixed"
    assert catalog.models["qwen-2.5-7B"].plugin is None
    assert "already in the catalog" in (host.records["mixed"].error or "")
