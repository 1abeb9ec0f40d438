"""Build exllamav2's CUDA extension before anything needs it, and say how long it took and what it can do.

exllamav2 from PyPI carries no compiled code: its first ``import`` builds ``exllamav2_ext`` with torch's JIT
extension loader (ninja runs nvcc and the host compiler over about fifty sources). Doing that here, alone and
timed, keeps the build out of the test and server timeouts, and later imports load the built module from the
same ``TORCH_EXTENSIONS_DIR`` (same sources and flags: no rebuild). How fast it goes is set by the environment:
``TORCH_CUDA_ARCH_LIST`` (one architecture: one device pass per source), ``MAX_JOBS`` (ninja's parallelism).

exllamav2 asks torch for a quiet build; the loader is wrapped before the import so that it runs verbosely and
ninja's output (every command, every compiler message) streams into the phase log as it happens. A watcher
thread reports progress from the build folder (objects done of ninja's edges) every 15 s, and ``.ninja_log``
afterwards gives the slowest sources and the parallelism reached.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from checklib import progress, report

EXTENSION = "exllamav2_ext"


def build_folder() -> Path | None:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) / EXTENSION if root else None


def edges(folder: Path) -> int:
    """Build steps in ``build.ninja`` (objects and the link), 0 before torch wrote it."""
    try:
        text = (folder / "build.ninja").read_text()
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if line.startswith("build ") and "phony" not in line)


def ninja_log(folder: Path) -> list[tuple[int, int, str]]:
    """(start ms, end ms, output) of each step ninja finished, from ``.ninja_log``."""
    steps = []
    try:
        lines = (folder / ".ninja_log").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split("\t")
        if len(parts) >= 4 and not line.startswith("#") and parts[0].isdigit() and parts[1].isdigit():
            steps.append((int(parts[0]), int(parts[1]), parts[3]))
    return steps


def watch(folder: Path, stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.wait(15):
        total = edges(folder)
        done = len({out for _, _, out in ninja_log(folder)})
        objects = len(list(folder.glob("*.o")))
        progress(f"compile: {time.monotonic() - started:.0f} s, {objects} objects, ninja {done}/{total or '?'}")


def verbose_loader() -> None:
    """Make torch's ``load`` verbose for exllamav2's call (it imports the name when ``exllamav2.ext`` runs)."""
    import torch.utils.cpp_extension as cpp

    original = cpp.load

    def load(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["verbose"] = True
        return original(*args, **kwargs)

    cpp.load = load


def summarize_build(folder: Path, seconds: float) -> None:
    steps = ninja_log(folder)
    if not steps:
        report(f"- extension: nothing built (already in {folder}), import took {seconds:.1f} s")
        return
    begin, end = min(s for s, _, _ in steps), max(e for _, e, _ in steps)
    busy = sum(e - s for s, e, _ in steps)
    slowest = sorted(steps, key=lambda step: step[0] - step[1])[:5]
    report(f"- extension built in {seconds:.1f} s (ninja wall {(end - begin) / 1000:.1f} s, {len(steps)} steps, "
           f"{busy / 1000:.0f} s of compiler time: parallelism {busy / max(end - begin, 1):.1f} with "
           f"MAX_JOBS={os.environ.get('MAX_JOBS', 'default')})")
    report("- slowest steps: " + ", ".join(f"{Path(out).name} {(e - s) / 1000:.0f} s" for s, e, out in slowest))


def main() -> int:
    folder = build_folder()
    progress(f"compile: TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')} "
             f"MAX_JOBS={os.environ.get('MAX_JOBS')} into {folder}")
    try:
        import torch
    except Exception as error:
        report(f"- torch is not importable: {type(error).__name__}: {error}")
        return 1
    if not torch.cuda.is_available():
        report("- no CUDA device: exllamav2's extension is not built (it needs one to import)")
        progress("compile: no CUDA device, nothing to build")
        return 2
    stop = threading.Event()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        threading.Thread(target=watch, args=(folder, stop), daemon=True).start()
    verbose_loader()
    began = time.monotonic()
    try:
        import exllamav2
        from exllamav2 import attn
        from exllamav2.ext import exllamav2_ext
        from exllamav2.generator import ExLlamaV2DynamicGenerator  # noqa: F401  (what the backend imports)
    except BaseException as error:
        stop.set()
        seconds = time.monotonic() - began
        message = str(error)
        print(message, flush=True)
        lines = [line for line in message.splitlines() if "error" in line.lower()][:15]
        report(f"- import exllamav2 FAILED after {seconds:.0f} s: {type(error).__name__}")
        report("```\n" + "\n".join(line[:300] for line in lines or message.splitlines()[-15:]) + "\n```")
        if folder is not None:
            summarize_build(folder, seconds)
        return 1
    stop.set()
    seconds = time.monotonic() - began
    progress(f"compile: exllamav2 {exllamav2.__version__} imported in {seconds:.1f} s")
    if folder is not None:
        summarize_build(folder, seconds)
    module = Path(getattr(exllamav2_ext, "__file__", "") or "?")
    size = module.stat().st_size / 2**20 if module.exists() else 0
    report(f"- exllamav2 {exllamav2.__version__}: extension {module} ({size:.1f} MiB)")
    paged = attn.has_flash_attn_with_paged
    report(f"- attention: flash-attn {attn.has_flash_attn} (paged {paged}), xformers {attn.has_xformers}, "
           f"torch SDPA lower-right {attn.has_lower_right_sdpa}")
    if not paged:
        report("- without flash-attn >= 2.5.7 exllamav2's dynamic generator cannot page its cache: the backend "
               "falls back to the unpaged generator, one request at a time (max_batch_size=1), prefix reuse of "
               "the previous request only; concurrent requests queue")
    return 0


if __name__ == "__main__":
    sys.exit(main())
