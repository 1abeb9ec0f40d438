#!/usr/bin/env python3
"""Speculative decoding benchmark: decode tok/s of the llama.cpp engine with and without drafts, in process.

Targets, all the embedded SmolLM2-135M-Instruct Q4_1 GGUF with one slot, greedy (``repeat_penalty`` 1.0):

* ``plain``: no ``draft_model_id``: what a model gets by default (flash attention as llama.cpp chooses: on for this
  build, CPU included);
* ``plain-fa``: the configuration speculation runs in (flash attention forced on, see
  ``backend.flash_attention``) with drafting switched off: the reference output of the speculative targets. Now
  that the default is on too, it matches ``plain``; it separated the effect of flash attention from the effect
  of drafts while the CPU default was off;
* ``lookup``: ``draft_model_id=prompt_lookup`` (n-gram drafts from the prompt and the output so far: the last
  3, else 2 tokens);
* ``lookup-n1``: the same, falling back to the last single token too (``PromptLookup(min_n=1)``; not the default);
* ``draft``: ``draft_model_id=<the same GGUF>``: a draft model as large as the target. Every greedy draft is
  accepted, so this shows the cost side: drafting K tokens costs K draft decodes on top of the verification.

Tasks: ``free`` (long stories: nothing to copy) and ``quoting`` (return a JSON document with one change, rename a
variable in a function; the answer is started for the model, as an agent editing its input would): up to
``--max-tokens`` tokens each. Decode rate = completion tokens after the first event / time from the first to
the last event (prefill and first token excluded). Acceptance = accepted / proposed draft tokens
(``engine.stats()``); steps/token = engine steps per completion token (1.0 without drafts).

Every run starts from cleared caches (same prefill, same KV layout), after waiting (``--quiet-wait``) for
other processes to leave the CPUs; runs during which they used more than CLEAN_MAX_CORES are marked noisy and
left out of the medians when clean ones exist. Targets run interleaved in rotating order. The load average is
printed before and after.

Exactness: the report counts outputs that differ from ``plain-fa``'s. Below 256 KV cells per slot the speculative
targets reproduce it bit for bit (``plugins/backend_llamacpp/tests/test_speculative.py``); beyond, llama.cpp's CPU
kernels give a token slightly different logits in a multi-token batch than alone, so a greedy output may flip
at a near tie (it then stays a sample of the same model, as ``plain``'s differ from ``plain-fa``'s).

Usage: ``python bench/bench_speculative.py [--rounds N] [--max-tokens N] [--json PATH]``.

Measured on the 2-core dev VM (``--rounds 5``, 160 tokens, load average 1.1-1.7 from other jobs, all runs
clean), median decode tok/s and ratio to ``plain-fa``:

=========  =========  ===========  ===========  ===========  ===========
task       plain      plain-fa     lookup       lookup-n1    draft
=========  =========  ===========  ===========  ===========  ===========
free       80.9 0.89  90.5 1.00    86.6 0.96    79.5 0.88    64.2 0.71
quoting    67.7 0.83  81.1 1.00    105.0 1.29   105.3 1.30   42.0 0.52
=========  =========  ===========  ===========  ===========  ===========

Acceptance: lookup 33% (free) / 62% (quoting), lookup-n1 21% / 63%, draft 100% / 94%. Outputs differing from
``plain-fa``: the speculative targets 5 of 10 (one quoting prompt, every round, past 256 cells), ``plain`` all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_spine import CLEAN_MAX_CORES, CpuMeter, gguf_path, prompts, settle, write_results

from gallama_backend_llamacpp.backend import LlamaCppBackend
from gallama_backend_llamacpp.speculative import PROMPT_LOOKUP, PromptLookup
from gallama_kernel.backend import GenerationRequest, SamplingParams
from gallama_kernel.config import ModelSpec

TARGETS = ("plain", "plain-fa", "lookup", "lookup-n1", "draft")
REFERENCE = "plain-fa"  # the speculative targets must reproduce its output
GREEDY = SamplingParams(temperature=0)
MAX_SEQ_LEN = 2048

CODE = '''def load_config(path):
    with open(path) as handle:
        data = json.load(handle)
    if "name" not in data:
        raise ValueError("missing name")
    servers = []
    for entry in data.get("servers", []):
        host = entry["host"]
        port = int(entry.get("port", 80))
        servers.append((host, port))
    return data["name"], servers
'''
PEOPLE = json.dumps({"people": [
    {"name": name, "age": age, "city": city, "email": f"{name.lower()}@example.com", "active": age % 2 == 0}
    for name, age, city in [("Alice", 30, "Paris"), ("Bob", 41, "Berlin"), ("Carol", 27, "Madrid"),
                            ("Dave", 35, "Rome"), ("Erin", 52, "Oslo"), ("Frank", 44, "Vienna"),
                            ("Grace", 38, "Lisbon"), ("Heidi", 29, "Prague")]]})


def chat(question: str, answer_start: str = "") -> str:
    """SmolLM2's chat format, with the assistant's answer started."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer_start}"


def tasks() -> dict[str, list[str]]:
    json_edit = chat(f"Return this JSON document with Alice's age changed to 31.\n{PEOPLE}",
                     PEOPLE[: PEOPLE.index("30")] + "31,")
    rename = chat("Rename the variable `servers` to `hosts` in this function and return the whole function.\n"
                  f"```python\n{CODE}```", "```python\n" + CODE[: CODE.index("servers")] + "hosts = []\n")
    return {"free": [chat(text) for text in prompts(2)], "quoting": [json_edit, rename]}


# -- one run ---------------------------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    task: str
    prompt: int
    completion_tokens: int
    finish_reason: str | None
    decode_tps: float | None
    proposed: int
    accepted: int
    steps: int
    other_cores: float
    text: str


def load(target: str, gguf: Path) -> LlamaCppBackend:
    draft = {"plain": None, "plain-fa": PROMPT_LOOKUP, "lookup": PROMPT_LOOKUP, "lookup-n1": PROMPT_LOOKUP,
             "draft": str(gguf)}[target]
    spec = ModelSpec(model_id=str(gguf), model_path=str(gguf), max_concurrent_requests=1, max_seq_len=MAX_SEQ_LEN,
                     draft_model_id=draft)
    backend = LlamaCppBackend(spec)
    backend.load()
    assert backend.engine is not None
    if target == "plain-fa":
        backend.engine.drafter = None  # the speculative configuration, drafting off
    elif target == "lookup-n1":
        backend.engine.drafter = PromptLookup(min_n=1)
    return backend


async def run_once(backend: LlamaCppBackend, target: str, task: str, index: int, prompt: str, max_tokens: int,
                   quiet_wait_s: float) -> Run:
    engine = backend.engine
    assert engine is not None
    engine.clear_cache()
    request = GenerationRequest(f"{target}-{task}-{index}", backend.tokenize(prompt), max_tokens, GREEDY)
    await settle(quiet_wait_s)
    before = engine.stats()
    meter = CpuMeter([])
    arrivals: list[tuple[float, int]] = []
    pieces: list[str] = []
    finish = None
    async for event in backend.stream(request):
        arrivals.append((time.perf_counter(), event.completion_tokens))
        pieces.append(event.text)
        finish = event.finish_reason
    other = meter.other_cores()
    after = engine.stats()
    (first_t, first_n), (last_t, last_n) = arrivals[0], arrivals[-1]
    rate = (last_n - first_n) / (last_t - first_t) if last_t > first_t else None
    return Run(target, task, index, last_n, finish, rate, after["draft_proposed"] - before["draft_proposed"],
               after["draft_accepted"] - before["draft_accepted"], after["steps"] - before["steps"], other,
               "".join(pieces))


# -- the benchmark ---------------------------------------------------------------------------------------------


def measure(rounds: int, max_tokens: int, quiet_wait_s: float) -> dict[str, Any]:
    gguf = gguf_path()
    load_before = os.getloadavg()
    print(f"model {gguf}\nload average before: {_loadavg(load_before)}", flush=True)
    backends = {target: load(target, gguf) for target in TARGETS}
    runs: list[Run] = []
    try:
        for backend in backends.values():  # warm-up
            asyncio.run(run_once(backend, "warm-up", "free", 0, chat("Say hi."), 8, 0.0))
        for r in range(rounds):
            for task, texts in tasks().items():
                for index, prompt in enumerate(texts):
                    for target in TARGETS[r % len(TARGETS):] + TARGETS[: r % len(TARGETS)]:
                        run = asyncio.run(run_once(backends[target], target, task, index, prompt, max_tokens,
                                                   quiet_wait_s))
                        runs.append(run)
                        _print_run(r, run)
    finally:
        for backend in backends.values():
            backend.close()
    load_after = os.getloadavg()
    print(f"load average after: {_loadavg(load_after)}", flush=True)
    return {"rounds": rounds, "max_tokens": max_tokens, "cores": len(os.sched_getaffinity(0)),
            "loadavg_before": load_before, "loadavg_after": load_after, "runs": [asdict(run) for run in runs],
            "summary": summarise(runs), "exactness": exactness(runs)}


def _loadavg(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _print_run(round_: int, run: Run) -> None:
    noisy = f"  [noisy: {run.other_cores:.2f} other cores]" if run.other_cores > CLEAN_MAX_CORES else ""
    accept = f"{run.accepted}/{run.proposed}" if run.proposed else "-"
    rate = "-" if run.decode_tps is None else f"{run.decode_tps:.1f}"
    print(f"  round {round_} {run.task:<8} #{run.prompt} {run.target:<9} {run.completion_tokens:>4} tok "
          f"{rate:>6} tok/s  accepted {accept:>8}  steps/token {run.steps / max(run.completion_tokens, 1):.2f}"
          f"{noisy}", flush=True)


def summarise(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and target: median decode rate over clean runs (all when none is clean), acceptance, steps."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for task in sorted({run.task for run in runs}):
        summary[task] = {}
        for target in TARGETS:
            rows = [run for run in runs if run.task == task and run.target == target and run.decode_tps]
            clean = [run for run in rows if run.other_cores <= CLEAN_MAX_CORES] or rows
            proposed, accepted = sum(r.proposed for r in rows), sum(r.accepted for r in rows)
            summary[task][target] = {
                "decode_tps": statistics.median(r.decode_tps for r in clean if r.decode_tps) if clean else None,
                "runs": len(rows), "clean_runs": sum(r.other_cores <= CLEAN_MAX_CORES for r in rows),
                "acceptance": accepted / proposed if proposed else None, "proposed": proposed, "accepted": accepted,
                "steps_per_token": sum(r.steps for r in rows) / max(1, sum(r.completion_tokens for r in rows))}
    return summary


def exactness(runs: list[Run]) -> dict[str, int]:
    """Runs whose text differs from the reference's for the same prompt (see the module docstring)."""
    reference = {(r.task, r.prompt): r.text for r in runs if r.target == REFERENCE}
    return {target: sum(r.text != reference.get((r.task, r.prompt), r.text) for r in runs if r.target == target)
            for target in TARGETS if target != REFERENCE}


def print_report(result: dict[str, Any]) -> None:
    print(f"\n{'task':<9}{'target':<10}{'tok/s':>8}{'vs plain':>10}{'vs plain-fa':>13}{'acceptance':>12}"
          f"{'steps/tok':>11}{'clean runs':>12}")
    for task, targets in result["summary"].items():
        plain, plain_fa = targets["plain"]["decode_tps"], targets["plain-fa"]["decode_tps"]
        for target, row in targets.items():
            rate = row["decode_tps"]
            acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.0%}"
            print(f"{task:<9}{target:<10}{_num(rate, '.1f'):>8}{_num(_ratio(rate, plain), '.2f'):>10}"
                  f"{_num(_ratio(rate, plain_fa), '.2f'):>13}{acceptance:>12}{row['steps_per_token']:>11.2f}"
                  f"{row['clean_runs']:>7}/{row['runs']}")
    print(f"\noutputs differing from {REFERENCE} (greedy; near ties past 256 cells, see the docstring): "
          f"{result['exactness']}")
    print(f"load average before {_loadavg(result['loadavg_before'])}, after {_loadavg(result['loadavg_after'])} "
          f"({result['cores']} cores)")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--quiet-wait", type=float, default=5.0,
                        help="seconds to wait, before each run, for other processes to leave the CPUs (0: off)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.max_tokens, args.quiet_wait)
    print_report(result)
    write_results(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
