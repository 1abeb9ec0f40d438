"""The exllama backend as the kernel sees it, on a machine without exllamav2 or a GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from gallama_backend_exllama.backend import ExLlamaBackend, resolve_draft_folder
from gallama_kernel.backend import BackendError
from gallama_kernel.config import ModelSpec
from gallama_kernel.plugins import create_host

HAS_EXLLAMA = importlib.util.find_spec("exllamav2") is not None


def test_registered_through_its_entry_point():
    host = create_host()
    assert host.records["exllama"].status == "loaded"
    assert host.backends["exllama"] is ExLlamaBackend


@pytest.mark.skipif(HAS_EXLLAMA, reason="exllamav2 is installed here")
def test_load_without_exllamav2_says_what_to_install(folder):
    backend = ExLlamaBackend(ModelSpec(model_id=str(folder), model_path=str(folder), backend="exllama"))
    with pytest.raises(BackendError, match=r"needs exllamav2 and CUDA .*gallama-backend-exllama\[engine\]"):
        backend.load()
    assert backend.loop is None


def test_settings_are_refused_before_anything_loads(folder, tmp_path_factory):
    gguf = tmp_path_factory.mktemp("gguf") / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for keys, message in ((dict(model_path=str(gguf)), "GGUF files go to backend=llama_cpp"),
                          (dict(model_path=str(folder), cache_quant="Q6", max_seq_len=10000), "exceeds the model"),
                          (dict(model_path=str(folder), n_threads=2), "n_threads is a CPU setting"),
                          (dict(model_path=str(folder), draft_model_id=str(gguf)), "not a folder")):
        backend = ExLlamaBackend(ModelSpec(model_id="m", backend="exllama", **keys))
        with pytest.raises(BackendError, match=message):
            backend.load()


def test_draft_folders_by_path_or_config_entry(folder, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / "model_config.yaml").write_text(f"small:\n  model_id: {folder}\n  backend: exllama\n")
    assert resolve_draft_folder("small", home) == str(folder)
    assert resolve_draft_folder(str(folder), home) == str(folder)
    with pytest.raises(BackendError, match="draft_model_id=missing: model file not found"):
        resolve_draft_folder("missing", home)


@pytest.mark.skipif(HAS_EXLLAMA, reason="exllamav2 is installed here")
def test_gallama_run_reports_the_missing_engine(folder: Path, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    result = subprocess.run([sys.executable, "-m", "gallama_kernel.cli", "run", "--port", "1", "-id",
                             f"model_id={folder} backend=exllama"], capture_output=True, text=True, timeout=120,
                            env={"GALLAMA_HOME_PATH": str(home), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "needs exllamav2 and CUDA" in result.stdout + result.stderr
