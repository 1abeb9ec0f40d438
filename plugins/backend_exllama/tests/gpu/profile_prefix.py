"""Where the time of a partly cached prompt goes, in process (no HTTP): the GPU check's profile phase.

The benchmark saw an agent loop's turn with most of its prompt cached start later than the same prompt sent cold
(exllamav2 without flash-attn, unpaged cache). This loads the tiny model through the backend, then times, each
under cProfile with the GPU synchronised: a warm-up prompt A; A extended by new tokens (its prefix cached); a
cold prompt of the same length; the cold prompt again (fully cached). It prints the wall times and, for the first
two, the functions with the most cumulative time.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO / "plugins" / "backend_exllama" / "tests"))


def main() -> int:
    import torch
    from exllama_folder import make_tiny_llama

    from gallama_backend_exllama.backend import ExLlamaBackend
    from gallama_kernel.backend import GenerationRequest, SamplingParams
    from gallama_kernel.config import ModelSpec

    folder = Path("/tmp/gpu-check/profile-llama")
    folder.mkdir(parents=True, exist_ok=True)
    folder = make_tiny_llama(folder, context=8192)
    backend = ExLlamaBackend(ModelSpec(model_id=str(folder), model_path=str(folder), backend="exllama",
                                       max_seq_len=8192, cache_size=16384, max_concurrent_requests=8))
    backend.load()
    vocab = 250

    def tokens(seed: int, count: int) -> list[int]:
        return [(seed * 7919 + i * 104729) % vocab + 1 for i in range(count)]

    def run(name: str, prompt: list[int], profile: bool) -> None:
        request = GenerationRequest(f"profile-{name}", prompt, 1, SamplingParams(temperature=0))

        async def go() -> list:
            return [event async for event in backend.stream(request)]

        profiler = cProfile.Profile() if profile else None
        torch.cuda.synchronize()
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        events = asyncio.run(go())
        torch.cuda.synchronize()
        if profiler is not None:
            profiler.disable()
        wall = time.perf_counter() - started
        final = events[-1]
        print(f"{name}: {len(prompt)} prompt tokens, {final.cached_tokens} cached, {wall * 1000:.1f} ms", flush=True)
        if profiler is not None:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
            print(text.getvalue(), flush=True)

    base = tokens(1, 3424)
    run("warm-up A", base, False)
    run("A + 784 new (prefix cached)", base + tokens(2, 784), True)
    cold = tokens(3, 4208)
    run("cold, same length", cold, True)
    run("cold prompt again (all cached)", cold, False)
    run("A + 784 new again, after a cold one", base + tokens(2, 784), False)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
