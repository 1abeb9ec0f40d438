"""Download catalog models from the Hugging Face hub into ``GALLAMA_HOME_PATH`` and register them.

Layout (everything gallama writes stays under ``GALLAMA_HOME_PATH``)::

    GALLAMA_HOME_PATH/
      model_config.yaml                       the entry NAME: {model_id: <path>, backend: <backend>}
      models/
        <name>-<quant>-<backend>/             one folder per download, e.g. qwen-2.5-7B-4.0-exllama
          <the repository's files>            a whole revision (ExLlamaV2 branch, embedding model) or one GGUF file
          .cache/huggingface/download/        huggingface_hub's metadata and ``*.incomplete`` partial files
        .hub-cache/                           huggingface_hub's cache folder (refs only: files go to the folders)

Resuming: huggingface_hub writes each file to ``.cache/huggingface/download/<hash>.<etag>.incomplete`` inside the
download folder and moves it into place when complete. Run the same command again after an interruption: the
partial file is continued with an HTTP ``Range`` request, files already complete are checked (commit and ETag) and
kept. Downloads use plain HTTP: Xet transfers (``hf_xet``) restart a file instead and cache chunks outside
``GALLAMA_HOME_PATH``, and ``hf_transfer`` deletes partial files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import Download, parse_quant
from .config import ConfigError, check_name, inside_home, save_model_entry

MODELS_DIR = "models"
HUB_CACHE_DIR = ".hub-cache"
PARTIAL_DIR = ".cache/huggingface/download"


class DownloadError(RuntimeError):
    """A download that failed (network, hub, disk); the message says what to do."""


@dataclass(frozen=True)
class DownloadResult:
    """What a finished download left on disk."""

    download: Download
    folder: Path
    """``GALLAMA_HOME_PATH/models/<name>-<quant>-<backend>``."""
    model_path: Path
    """What ``model_id`` points to: the GGUF file, or the folder for a whole revision."""
    size: int
    """Bytes on disk under ``folder``."""


def target_folder(home: Path, download: Download) -> Path:
    """The folder a download goes to; refused (:class:`ConfigError`) if a name is not a plain name or the folder
    resolves outside ``home`` (a symlink pointing elsewhere)."""
    check_name(download.model, "model name")
    check_name(download.backend, "backend name")
    if parse_quant(download.quant) != download.quant:
        raise ConfigError(f"quantization {download.quant!r} is refused: not a canonical label")
    return inside_home(home, MODELS_DIR, check_name(download.folder_name, "download folder"))


def model_path(folder: Path, download: Download) -> Path:
    """The path ``model_id`` gets: ``folder/file`` for one file, else ``folder``; it must stay inside ``folder``."""
    if download.file is None:
        return folder
    path = folder.joinpath(*download.file.split("/"))
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(f"{path} is refused: it resolves outside {folder}")
    return path


def disk_usage(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            entry = Path(root) / name
            if not entry.is_symlink():
                total += entry.stat().st_size
    return total


def human_size(size: int) -> str:
    """``4_683_072_000`` → ``"4.7 GB"`` (powers of 1000, like the hub)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _offline() -> bool:
    import huggingface_hub.constants as hub_constants

    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return bool(hub_constants.HF_HUB_OFFLINE) or flag.upper() in ("1", "ON", "YES", "TRUE")


def _plain_http() -> None:
    """Make huggingface_hub download over plain HTTP with resumable ``.incomplete`` files (see the module doc)."""
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_DISABLE_XET = True
    if hasattr(hub_constants, "HF_HUB_ENABLE_HF_TRANSFER"):
        hub_constants.HF_HUB_ENABLE_HF_TRANSFER = False


def _explain(error: Exception, download: Download, folder: Path, endpoint: str) -> DownloadError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    resume = (f"run the same command again to resume (partial files are kept in {folder / PARTIAL_DIR})")
    if isinstance(error, GatedRepoError):
        return DownloadError(f"{download.repo} is gated: accept its conditions on the hub, then log in "
                             "(huggingface-cli login, or set HF_TOKEN) and run the command again")
    if isinstance(error, RepositoryNotFoundError):
        return DownloadError(f"repository {download.repo} was not found on {endpoint} (or it is private)")
    if isinstance(error, RevisionNotFoundError):
        return DownloadError(f"revision '{download.revision}' was not found in {download.repo}")
    if isinstance(error, LocalEntryNotFoundError):
        return DownloadError(f"could not reach {endpoint} ({error.__cause__ or error}); {resume}")
    if isinstance(error, EntryNotFoundError):
        return DownloadError(f"file '{download.file}' was not found in {download.repo}@{download.revision}")
    return DownloadError(f"download of {download.source} failed: {type(error).__name__}: {error}; {resume}")


Progress = Callable[[int, int | None], None]
"""``progress(bytes_on_disk, expected_total_or_None)``, called a few times a second during a download."""


def expected_size(download: Download, endpoint: str) -> int | None:
    """Bytes the download will take, from the hub's file metadata; ``None`` when the hub does not say."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint).model_info(download.repo, revision=download.revision, files_metadata=True)
    except Exception:  # only for the progress display: any failure just leaves the total unknown
        return None
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    if download.file is not None:
        return sizes.get(download.file)
    kept = [size for name, size in sizes.items()
            if not any(fnmatch.fnmatch(name, pattern) for pattern in download.ignore)]
    return sum(kept) if kept and all(size is not None for size in kept) else None


class _Watcher(threading.Thread):
    """Reports the bytes under a folder (partial files included) until stopped."""

    def __init__(self, folder: Path, total: int | None, progress: Progress, every_s: float = 0.25) -> None:
        super().__init__(name="gallama-download-progress", daemon=True)
        self.folder, self.total, self.progress, self.every_s = folder, total, progress, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.report()

    def report(self) -> None:
        with contextlib.suppress(OSError):  # files come and go while huggingface_hub renames them
            self.progress(disk_usage(self.folder), self.total)


def fetch(download: Download, home: Path, progress: Progress | None = None) -> DownloadResult:
    """Download ``download`` into its folder under ``home`` (resuming what an earlier run left). With
    ``progress``, bytes on disk are reported as the transfer goes (huggingface_hub's own bars are off);
    without it, huggingface_hub shows its progress bars on stderr.

    :raises ConfigError: the folder would be outside ``home``.
    :raises DownloadError: the hub refused or the transfer failed; partial files are kept for the next run.
    """
    folder = target_folder(home, download)
    path = model_path(folder, download)
    if _offline():
        raise DownloadError("HF_HUB_OFFLINE is set: unset it to download models")
    _plain_http()
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.constants import ENDPOINT
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or ENDPOINT
    cache = inside_home(home, MODELS_DIR, HUB_CACHE_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {"revision": download.revision, "local_dir": folder, "cache_dir": cache,
                              "endpoint": endpoint}
    watcher = None
    if progress is not None:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        watcher = _Watcher(folder, expected_size(download, endpoint), progress)
        watcher.start()
    try:
        if download.file is not None:
            hf_hub_download(download.repo, download.file, **common)
        else:
            snapshot_download(download.repo, ignore_patterns=list(download.ignore) or None, **common)
    except (HfHubHTTPError, OSError, ValueError) as error:  # what huggingface_hub raises for hub and transfer errors
        raise _explain(error, download, folder, endpoint) from error
    finally:
        if watcher is not None:
            watcher.stopped.set()
            watcher.report()
    if not path.exists():
        raise DownloadError(f"the download finished but {path} is missing")
    target_folder(home, download)  # still inside home after the transfer (nothing swapped in a symlink)
    return DownloadResult(download, folder, path, disk_usage(folder))


def register(home: Path, result: DownloadResult) -> Path:
    """Write the model into ``model_config.yaml`` as ``NAME: {model_id: <path>, backend: <backend>}`` (other keys
    of an existing entry are kept) so that ``gallama run NAME`` serves it; returns the config file."""
    values = {"model_id": str(result.model_path), "backend": result.download.backend}
    return save_model_entry(home, result.download.model, values)
