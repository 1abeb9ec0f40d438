"""One engine loop per model: owns the llama.cpp context and serves several requests at once.

Each step builds one batch: one token for every decoding slot, then prompt chunks of slots still in prefill.
While streams are decoding, the prompt chunk is sized from the measured cost of a prompt token so that a step
takes about ``step_target_s``: a long prompt cannot stall running streams. New requests join between steps; a finished
or cancelled request leaves at once. A slot keeps the tokens whose KV it holds, so a new request whose prompt
shares a prefix with what a free slot holds only computes the rest.

A job may carry an llguidance matcher (its request's grammar): before that slot samples, the disallowed tokens'
logits become ``-inf``; the sampled token advances the matcher; the generation ends when the grammar admits
nothing more, and a matcher error ends the request with a :class:`BackendError`, never unconstrained text.

Speculative decoding (an optional :class:`~.speculative.Drafter`): every decoding slot may get up to ``draft_k``
draft tokens ``d1..dK``; the step then feeds ``[last, d1..dK]`` for it, with logits at every position. The slot
then samples position by position exactly as without drafts (grammar mask from the matcher state after the
tokens accepted so far, the slot's own sampler chain, stop strings, ``max_tokens``): the token ``t`` sampled at
position ``i`` is emitted, and the next position is only looked at while ``t == d(i+1)``. Every emitted token is
thus drawn from the target model's distribution at its position, with the slot's sampler state advanced exactly
as without drafts, so the output is that of plain decoding: greedy gives the same tokens, a seeded sampler the
same draws, as long as llama.cpp gives a token the same logits in a multi-token batch as alone (bit for bit on
the CPU with flash attention below 256 KV cells per slot; beyond, a near tie may flip). The KV of rejected draft
positions is dropped. Slots in prefill never draft, and an engine without a drafter does no extra work.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import llama_cpp as ll
import llguidance

from gallama_kernel.plugin import (
    BackendError,
    CoreShare,
    Emit,
    GenerationEvent,
    GenerationRequest,
    StopMatcher,
    core_share,
    hold_text,
)

from .grammar import TokenMask
from .model import LlamaModel, common_prefix
from .sampling import build_chain
from .speculative import Drafter, DraftRequest

log = logging.getLogger("gallama.llama_cpp")


@dataclass
class Job:
    """One request in the engine. ``matcher``: a fresh llguidance matcher for ``request.grammar`` (built by
    the caller, off the engine thread), advanced by the engine as tokens are sampled."""

    request: GenerationRequest
    emit: Emit
    cancelled: bool = False
    matcher: llguidance.LLMatcher | None = None


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    job: Job | None = None
    sampler: ll.llama_sampler_p | None = None
    pending: list[int] = field(default_factory=list)  # tokens to decode next
    logit_index: int = -1
    generated: int = 0
    reused: int = 0
    last_used: int = 0  # admission counter; among equal prefixes the least recently used slot is taken
    prompt_len: int = 0  # tokens of the last prompt admitted: a prompt that starts with them continues it
    stops: StopMatcher | None = None
    decoder: codecs.IncrementalDecoder | None = None
    matcher: llguidance.LLMatcher | None = None  # the job's grammar, when it has one
    spoken: frozenset[int] = frozenset()  # control tokens whose text the output shows (the grammar's special)
    text: str = ""  # sampled text not emitted yet (a verification emits its tokens' text at once)
    emitted_at: float | None = None  # when text last went out (None: none yet); see _emit_text
    drafts: list[int] = field(default_factory=list)  # draft tokens fed after pending[0] in this step
    draft_k: int = 0  # draft tokens to ask for next (adapted to the acceptance)


@dataclass(frozen=True)
class EngineConfig:
    n_slots: int
    n_ctx_per_slot: int
    n_threads: int | None  # compute threads, decode and prompt alike; None: a share of the cores (see _take_cores)
    n_batch: int = 512
    step_target_s: float = 0.12  # step length to aim for while streams decode (their inter-token gap)
    min_prefill_chunk: int = 16
    min_whole_reuse: int = 32  # a slot holding a whole prompt at least this long may serve it again (_choose_slot)
    min_copy_gain: int = 16  # fewer shared tokens are never copied: a short prefill costs about one decode step
    kv_bytes_per_cell: float = 0.0  # K and V of one token over all layers: prices a copy of a slot's KV
    copy_bytes_per_s: float = 8e9  # memory bandwidth assumed for that copy (measured: 94 MB in 8-12 ms)
    state_bytes_per_s: float = 3e9  # a copy of the donor's own cells through a host buffer (23 MB in 6 ms)
    state_copy_s: float = 0.0005  # and its fixed part
    prompt_token_s_guess: float = 0.003  # prefill cost per token until one is measured (SmolLM2, 2 cores)
    type_k: int = ll.GGML_TYPE_F16
    type_v: int = ll.GGML_TYPE_F16
    flash_attention: bool | None = None  # None: llama.cpp decides
    draft_tokens: int = 4  # draft tokens a slot asks for first (with a drafter)
    draft_max: int = 8  # and at most, after runs of fully accepted drafts


class Engine:
    """The engine thread and its request queue."""

    def __init__(self, model: LlamaModel, config: EngineConfig, drafter: Drafter | None = None,
                 cores: CoreShare | None = None) -> None:
        self.model = model
        self.config = config
        self.drafter = drafter
        params = ll.llama_context_default_params()
        params.n_ctx = config.n_ctx_per_slot * config.n_slots
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_batch
        params.n_seq_max = config.n_slots
        self.cores = cores or core_share()
        self.n_threads = config.n_threads or self.cores.threads()
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k = config.type_k
        params.type_v = config.type_v
        params.kv_unified = False  # every slot owns n_ctx_per_slot cells: no request can starve another
        params.no_perf = True
        if config.flash_attention is not None:
            params.flash_attn_type = (ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attention
                                      else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = ll.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context (cache too large for memory?)")
        self.memory = ll.llama_get_memory(self.ctx)
        if drafter is not None:
            try:
                drafter.open(params, config.n_slots)
            except RuntimeError:
                ll.llama_free(self.ctx)
                raise
        self.batch = ll.llama_batch_init(config.n_batch, 0, 1)
        self.slots = [Slot(seq_id=i) for i in range(config.n_slots)]
        self.mask = TokenMask(model.n_vocab)
        self.waiting: deque[Job] = deque()
        self.wakeup = threading.Condition()
        self.running = True
        self.steps = 0
        self.admissions = 0
        self.draft_proposed = 0  # draft tokens verified, and of those accepted
        self.draft_accepted = 0
        self.decode_step_s: float | None = None  # moving averages, measured on this machine
        self.prompt_token_s: float | None = None
        self.stream_copy_s = config.n_ctx_per_slot * config.kv_bytes_per_cell / config.copy_bytes_per_s
        self.copy_buffer = (ctypes.c_uint8 * 0)()  # reused by cell copies, grown as needed
        self._holding_cores = False
        self.thread = threading.Thread(target=self._loop, name="gallama-llama-cpp-engine", daemon=True)
        self.thread.start()

    # -- called from other threads ---------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.wakeup:
            self.waiting.append(job)
            self.wakeup.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self.wakeup:
            self.wakeup.notify()

    def stats(self) -> dict[str, int]:
        return {"slots": len(self.slots), "busy": sum(s.job is not None for s in self.slots), "threads": self.n_threads,
                "waiting": len(self.waiting), "steps": self.steps, "context_length": self.config.n_ctx_per_slot,
                "draft_proposed": self.draft_proposed, "draft_accepted": self.draft_accepted}

    def clear_cache(self) -> None:
        """Forget what every slot (and the draft model) holds, as if just loaded. For tests and benchmarks that
        compare runs from the same state: llama.cpp's logits differ in the last bits with the KV cells' layout,
        which depends on a slot's history. Call it only while no request runs."""
        with self.wakeup:
            if self.waiting or any(slot.job is not None for slot in self.slots):
                raise RuntimeError("clear_cache() while requests run")
            ll.llama_memory_clear(self.memory, True)
            for slot in self.slots:
                slot.cached = []
            if self.drafter is not None:
                self.drafter.reset()

    def close(self) -> None:
        with self.wakeup:
            self.running = False
            self.wakeup.notify()
        self.thread.join(timeout=30)
        for slot in self.slots:
            self._free_sampler(slot)
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        if self.drafter is not None:
            self.drafter.close()

    # -- engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while self.running and not self.waiting and not any(s.job for s in self.slots):
                    self._release_cores()
                    self.wakeup.wait()
                if not self.running:
                    break
                self._admit()
            for slot in self.slots:
                if slot.job is not None and slot.job.cancelled:
                    self._release(slot)
            if any(s.job for s in self.slots):
                try:
                    self._take_cores()
                    self._step()
                except Exception as error:  # never let one bad step kill the engine
                    log.exception("engine step failed")
                    for slot in self.slots:
                        if slot.job is not None:
                            slot.job.emit(error)
                            self._release(slot, keep_cache=False)
        self._release_cores()
        for slot in self.slots:
            if slot.job is not None:
                slot.job.emit(RuntimeError("the model was unloaded"))

    def _take_cores(self) -> None:
        """Hold this worker's seat on the core board while there is work, and run the next step with its share of
        the cores now (a fixed ``n_threads`` keeps its count); llama.cpp sizes its OpenMP team per graph, so the
        count may change from one step to the next."""
        if not self._holding_cores:
            self.cores.hold(id(self), self.config.n_threads)
            self._holding_cores = True
        if self.config.n_threads:
            return
        threads = self.cores.threads()
        if threads != self.n_threads:
            ll.llama_set_n_threads(self.ctx, threads, threads)
            if self.drafter is not None:
                self.drafter.set_threads(threads)
            self.n_threads = threads

    def _release_cores(self) -> None:
        if self._holding_cores:
            self.cores.release(id(self))
            self._holding_cores = False

    def _admit(self) -> None:
        """Move waiting jobs (oldest first) into free slots, preferring the slot whose cache serves them best."""
        while self.waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            prompt = job.request.prompt_tokens
            shared = {s.seq_id: common_prefix(s.cached, prompt) for s in self.slots}  # once per admission
            donor = max(self.slots, key=lambda s: shared[s.seq_id])
            slot = _choose_slot(free, shared, len(prompt), self.config.min_whole_reuse,
                                partial(self._copy_pays, cells=len(donor.cached)))
            self._borrow_prefix(slot, shared)
            reuse = min(shared[slot.seq_id], len(prompt) - 1)  # the last token yields logits
            ll.llama_memory_seq_rm(self.memory, slot.seq_id, reuse, -1)
            slot.cached = slot.cached[:reuse]
            slot.job = job
            slot.pending = prompt[reuse:]
            slot.reused = reuse
            slot.prompt_len = len(prompt)
            self.admissions += 1
            slot.last_used = self.admissions
            slot.generated = 0
            slot.sampler = build_chain(job.request.sampling, self.model.n_vocab)
            slot.stops = StopMatcher(job.request.stop)
            slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            slot.matcher = job.matcher
            slot.spoken = self._spoken(job)
            slot.text = ""
            slot.emitted_at = None
            slot.draft_k = self.config.draft_tokens

    def _spoken(self, job: Job) -> frozenset[int]:
        """The control tokens the job's grammar writes (its ``special`` texts): shown as their text."""
        grammar = job.request.grammar
        if grammar is None or not grammar.special:
            return frozenset()
        found = (self.model.special_token(text) for _, text in grammar.special)
        return frozenset(token for token in found if token is not None)

    def _copy_s(self, cells: int) -> float:
        """The time to copy a slot holding ``cells`` tokens into another: its cells alone through a host buffer,
        or llama.cpp's copy of the whole KV stream, whichever is shorter.

        Slots are separate KV streams, which ``llama_memory_seq_cp`` copies whole (``n_ctx_per_slot`` cells:
        SmolLM2's 4,096 are 94 MB, 8-12 ms here), while the state of a sequence holds only its cells (30 cells:
        0.7 MB, 0.5 ms), so a short opening is copied that way and a long conversation as a stream."""
        cells_s = self.config.state_copy_s + cells * self.config.kv_bytes_per_cell / self.config.state_bytes_per_s
        return min(cells_s, self.stream_copy_s)

    def _copy_pays(self, gain: int, cells: int) -> bool:
        """Whether copying a slot that holds ``cells`` tokens beats computing ``gain`` more prompt tokens (about
        3 ms a token on 2 cores): even a chat template's 30-token default system prompt is worth it, but not a few
        tokens, whose prefill costs about a decode step whatever their number."""
        saved_s = gain * (self.prompt_token_s or self.config.prompt_token_s_guess)
        return gain >= self.config.min_copy_gain and saved_s > 2 * self._copy_s(cells)

    def _borrow_prefix(self, slot: Slot, shared: dict[int, int]) -> None:
        """Copy another slot's KV into ``slot`` when it shares a longer prefix with the prompt and the copy pays.

        Requests that open like another conversation (the same system prompt) then reuse it without taking that
        conversation's slot."""
        others = [s for s in self.slots if s is not slot]
        if not others:  # a single slot has nobody to borrow from
            return
        donor = max(others, key=lambda s: shared[s.seq_id])
        length = shared[donor.seq_id]
        if not self._copy_pays(length - shared[slot.seq_id], len(donor.cached)):
            return
        by_cells = self._copy_s(len(donor.cached)) < self.stream_copy_s
        if not (by_cells and self._copy_cells(donor, slot)):
            ll.llama_memory_seq_cp(self.memory, donor.seq_id, slot.seq_id, -1, -1)
        slot.cached = donor.cached[:length]
        ll.llama_memory_seq_rm(self.memory, slot.seq_id, length, -1)
        shared[slot.seq_id] = length

    def _copy_cells(self, donor: Slot, slot: Slot) -> bool:
        """Copy the donor's cells into ``slot`` (emptied first) through the sequence state; False if llama.cpp
        refused, leaving ``slot`` empty."""
        ll.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        size = ll.llama_state_seq_get_size_ext(self.ctx, donor.seq_id, 0)
        if len(self.copy_buffer) < size:
            self.copy_buffer = (ctypes.c_uint8 * size)()
        written = ll.llama_state_seq_get_data_ext(self.ctx, self.copy_buffer, size, donor.seq_id, 0)
        if written and ll.llama_state_seq_set_data_ext(self.ctx, self.copy_buffer, written, slot.seq_id, 0):
            return True
        ll.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        return False

    def _step(self) -> None:
        batch, n = self.batch, 0
        decoding = [s for s in self.slots if s.job is not None and len(s.pending) == 1 and s.generated > 0]
        prefilling = [s for s in self.slots if s.job is not None and s not in decoding]
        started = time.perf_counter()
        drafts = self._draft(decoding) if self.drafter is not None and decoding else {}
        decode_tokens = len(decoding) + sum(len(d) for d in drafts.values())
        budget = self.config.n_batch - decode_tokens
        if decoding:
            budget = min(budget, self._prefill_chunk())
        fed: list[tuple[Slot, list[int]]] = []
        for slot in decoding + prefilling:
            is_decoding = slot in decoding
            if is_decoding:
                slot.drafts = drafts.get(slot.seq_id, [])
                take = slot.pending + slot.drafts
            else:
                take = slot.pending[: max(budget, 0)]
                budget -= len(take)
            if not take:
                slot.logit_index = -1
                continue
            position = len(slot.cached)
            for offset, token in enumerate(take):
                batch.token[n] = token
                batch.pos[n] = position + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = is_decoding  # a decoding slot samples at every position it feeds
                n += 1
            if is_decoding:
                slot.logit_index = n - len(take)
            else:
                done = len(take) == len(slot.pending)
                batch.logits[n - 1] = done
                slot.logit_index = n - 1 if done else -1
            fed.append((slot, take))
        batch.n_tokens = n
        status = ll.llama_decode(self.ctx, batch)
        self.steps += 1
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        self._learn_costs(time.perf_counter() - started, n - decode_tokens, bool(decoding))
        for slot, take in fed:
            slot.cached.extend(take)
            slot.pending = slot.pending[len(take):]
        for slot, _ in fed:
            if slot.logit_index >= 0 and slot.job is not None:
                if slot.drafts:
                    self._verify(slot)
                else:
                    token = self._sample(slot, slot.logit_index)
                    if token is not None:
                        slot.pending = [token]
                        self._emit_text(slot)

    def _draft(self, decoding: list[Slot]) -> dict[int, list[int]]:
        """Draft tokens per seq_id for the decoding slots, never more than the request may still emit after the
        token the slot samples anyway, nor than its KV has cells for."""
        assert self.drafter is not None
        requests: list[DraftRequest] = []
        room = self.config.n_batch - len(decoding)  # the batch holds every decoding slot's token and its drafts
        for slot in decoding:
            job = slot.job
            assert job is not None
            k = min(slot.draft_k, job.request.max_tokens - slot.generated - 1,
                    self.config.n_ctx_per_slot - len(slot.cached) - 1, room)
            if k > 0 and not job.cancelled:
                requests.append((slot.seq_id, slot.cached + slot.pending, k))
                room -= k
        if not requests:
            return {}
        limits = {seq_id: k for seq_id, _, k in requests}
        return {seq_id: draft[: limits[seq_id]] for seq_id, draft in self.drafter.propose(requests).items()
                if draft and seq_id in limits}

    def _verify(self, slot: Slot) -> None:
        """Sample ``slot`` at ``[last, d1..dK]`` position by position while its samples match the drafts; drop the
        KV of the positions after the last match."""
        job = slot.job
        assert job is not None
        drafts, slot.drafts = slot.drafts, []
        accepted = 0
        for i in range(len(drafts) + 1):
            token = self._sample(slot, slot.logit_index + i)
            if token is None:  # finished or failed: the slot is free
                break
            if i < len(drafts) and token == drafts[i] and not job.cancelled:
                accepted += 1  # its KV (fed as d(i+1)) is right: the next position's logits are the model's own
                continue
            slot.pending = [token]
            break
        keep = len(slot.cached) - len(drafts) + accepted
        ll.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1)
        del slot.cached[keep:]
        self.draft_proposed += len(drafts)
        self.draft_accepted += accepted
        if accepted == len(drafts):
            slot.draft_k = min(self.config.draft_max, 2 * slot.draft_k)
        else:
            slot.draft_k = max(1, accepted + 1)
        if slot.job is not None:
            self._emit_text(slot)

    def _prefill_chunk(self) -> int:
        if self.prompt_token_s is None:
            return 4 * self.config.min_prefill_chunk
        spare = self.config.step_target_s - (self.decode_step_s or 0.0)
        return max(self.config.min_prefill_chunk, min(self.config.n_batch, int(spare / self.prompt_token_s)))

    def _learn_costs(self, elapsed: float, prompt_tokens: int, with_decodes: bool) -> None:
        if prompt_tokens == 0:
            self.decode_step_s = _average(self.decode_step_s, elapsed)
        elif prompt_tokens >= self.config.min_prefill_chunk:
            decode_part = (self.decode_step_s or 0.0) if with_decodes else 0.0
            per_token = max(elapsed - decode_part, 0.0) / prompt_tokens
            self.prompt_token_s = _average(self.prompt_token_s, per_token)

    def _sample(self, slot: Slot, index: int) -> int | None:
        """Sample ``slot``'s next token from the logits at batch ``index``; its text goes to ``slot.text``.

        Returns the token, or None when the generation ended with it (end of turn, stop string, grammar
        complete, ``max_tokens``: the slot is then released and its last event emitted) or failed.
        """
        job = slot.job
        assert job is not None and slot.stops is not None and slot.decoder is not None
        matcher = slot.matcher
        if matcher is not None:
            error = self.mask.apply(matcher, ll.llama_get_logits_ith(self.ctx, index))
            if error is not None:
                self._fail(slot, error)
                return None
        token = ll.llama_sampler_sample(slot.sampler, self.ctx, index)
        request = job.request
        if self.model.is_eog(token):
            self._finish(slot, slot.decoder.decode(b"", final=True) + slot.stops.flush(), "stop")
            return None
        if matcher is not None and not matcher.consume_token(token):
            self._fail(slot, matcher.get_error())
            return None
        slot.generated += 1
        piece = self.model.special_piece(token) if token in slot.spoken else self.model.piece(token)
        text, stopped = slot.stops.feed(slot.decoder.decode(piece))
        if stopped:
            self._finish(slot, text, "stop")
            return None
        complete = matcher is not None and matcher.is_stopped()  # the grammar admits nothing more
        if complete or slot.generated >= request.max_tokens:
            tail, _ = slot.stops.feed(slot.decoder.decode(b"", final=True))
            self._finish(slot, text + tail + slot.stops.flush(), "stop" if complete else "length")
            return None
        slot.text += text
        return token

    def _emit_text(self, slot: Slot) -> None:
        """Send the slot's pending text, unless it is held: text sampled within the request's
        ``emit_interval_s`` of the last event waits for a later one (the final event at the latest). Fewer
        events mean fewer wake-ups of the event loop, the gateway and the client per token, which on a CPU
        compete with the compute threads. The first text of a generation is never held."""
        job = slot.job
        if not slot.text or job is None:
            return
        now = time.perf_counter()
        if hold_text(slot.emitted_at, job.request.emit_interval_s, now):
            return
        slot.emitted_at = now
        job.emit(GenerationEvent(slot.text, slot.generated))
        slot.text = ""

    def _finish(self, slot: Slot, text: str, reason: str) -> None:
        job = slot.job
        assert job is not None
        event = GenerationEvent(slot.text + text, slot.generated, reason,  # type: ignore[arg-type]
                                prompt_tokens=len(job.request.prompt_tokens), cached_tokens=slot.reused,
                                stop_sequence=slot.stops.matched if slot.stops is not None else None)
        self._release(slot)  # before emitting: whoever sees the last event sees the slot free
        job.emit(event)

    def _fail(self, slot: Slot, message: str) -> None:
        """End the slot's request with an error: its matcher can no longer constrain the output."""
        job = slot.job
        assert job is not None
        self._release(slot)
        job.emit(BackendError(f"grammar enforcement failed: {message or 'unknown matcher error'}"))

    def _release(self, slot: Slot, keep_cache: bool = True) -> None:
        if not keep_cache:
            ll.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            slot.cached = []
        slot.job = None
        slot.pending = []
        slot.matcher = None
        slot.spoken = frozenset()
        slot.text = ""
        slot.drafts = []
        self._free_sampler(slot)

    @staticmethod
    def _free_sampler(slot: Slot) -> None:
        if slot.sampler is not None:
            ll.llama_sampler_free(slot.sampler)
            slot.sampler = None


def _choose_slot(free: list[Slot], shared: dict[int, int], prompt_tokens: int, min_whole: int,
                 copy_pays: Callable[[int], bool]) -> Slot:
    """The free slot for a prompt (``shared``: its common prefix with what each slot holds, by seq_id) that
    serves it best without wrecking another conversation's cache.

    A slot qualifies when taking it loses nothing another request would want: its whole cache is a prefix of the
    prompt (an empty slot, or a request cancelled in prefill), the prompt starts with the slot's last prompt (the
    next turn of its conversation: at most its previous answer, which the prompt carries again, is recomputed),
    or it holds the whole prompt of at least ``min_whole`` tokens (the same request again, a regenerated reply).
    Among those, the slot whose start into the prompt is furthest wins: its own prefix, or the longest prefix any
    slot holds when copying that pays (see ``Engine._borrow_prefix``); then the longer own prefix, then the least
    recently used. When none qualifies, the least recently used slot (the oldest conversation) is taken. So two
    agents that open with the same system prompt keep their own slots: the second one copies the opening.
    """
    whole = prompt_tokens - 1  # the most a request reuses: its last token is computed for its logits
    longest = max(shared.values(), default=0)

    def start(slot: Slot) -> int:
        own = shared[slot.seq_id]
        return longest if copy_pays(longest - own) else own

    keeping = [slot for slot in free if shared[slot.seq_id] >= min(len(slot.cached), slot.prompt_len)
               or shared[slot.seq_id] >= whole >= min_whole]
    if keeping:
        return max(keeping, key=lambda slot: (start(slot), shared[slot.seq_id], -slot.last_used))
    return min(free, key=lambda slot: slot.last_used)


def _average(current: float | None, sample: float, weight: float = 0.2) -> float:
    return sample if current is None else current + weight * (sample - current)
