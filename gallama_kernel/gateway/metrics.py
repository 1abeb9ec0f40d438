"""Prometheus metrics of the gateway and every worker behind it (``GET /metrics``, admin scope once keys exist).

Two sources. What the gateway sees of each request is counted as it ends (:meth:`Metrics.observe`): requests by
route, model and status; prompt, cached and generated tokens; and, for streams, the time to the first generated
chunk and the gaps between chunks (a chunk holds the tokens produced since the previous one: one, unless the
model's ``stream_interval_ms`` groups them). What only the workers know is read from their ``/health`` when
``/metrics`` is scraped: slots, busy slots, queue depth, engine steps, grammar compilations, cache hits and
compile time, draft tokens proposed and accepted, and, from the pool, each replica's restarts and state and its
affinity counters (requests routed to it because it held their prefix or session, routed to it by load with no
replica holding them, or by load because the replica holding them was saturated: affinity.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .access import CallRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health",
                    "/health/live", "/metrics", "/add_model", "/remove_model", "/list_loaded_models"})

# worker health field -> (metric name, help, kind)
WORKER_FIELDS = {
    "slots": ("gallama_slots", "Requests a replica runs at once.", "gauge"),
    "busy": ("gallama_busy_slots", "Slots running a request now.", "gauge"),
    "waiting": ("gallama_queue_depth", "Requests waiting for a slot in the replica's engine.", "gauge"),
    "steps": ("gallama_engine_steps", "Engine steps (batched decodes) so far.", "counter"),
    "grammar_compilations": ("gallama_grammar_compilations", "Grammars compiled (cache misses).", "counter"),
    "grammar_cache_hits": ("gallama_grammar_cache_hits", "Grammars found already compiled.", "counter"),
    "grammar_compile_seconds": ("gallama_grammar_compile_seconds", "Time spent compiling grammars.", "counter"),
    "draft_proposed": ("gallama_draft_tokens_proposed", "Draft tokens verified by the model.", "counter"),
    "draft_accepted": ("gallama_draft_tokens_accepted", "Draft tokens the model accepted.", "counter"),
    "affinity_hits": ("gallama_affinity_hits", "Requests routed to the replica holding their prefix or session.",
                      "counter"),
    "affinity_misses": ("gallama_affinity_misses", "Requests no replica held a prefix or session of, routed by load.",
                        "counter"),
    "affinity_overflows": ("gallama_affinity_overflows", "Requests whose replica was saturated, routed by load.",
                           "counter"),
}


class _Snapshot(Collector):
    """The workers' numbers as read for one scrape."""

    def __init__(self, replicas: list[tuple[str, int, str, int, dict[str, Any]]]) -> None:
        self.replicas = replicas  # (model, replica, state, restarts, health)

    def collect(self) -> Iterable[Any]:
        labels = ["model", "replica"]
        for field, (name, text, kind) in WORKER_FIELDS.items():
            family: Any = (CounterMetricFamily(name, text, labels=labels) if kind == "counter"
                           else GaugeMetricFamily(name, text, labels=labels))
            for model, replica, _, _, health in self.replicas:
                value = health.get(field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    family.add_metric([model, str(replica)], value)
            yield family
        restarts = CounterMetricFamily("gallama_worker_restarts", "Times a replica's worker was restarted.",
                                       labels=labels)
        up = GaugeMetricFamily("gallama_replica_ready", "1 while the replica can serve.", labels=[*labels, "state"])
        for model, replica, state, count, _ in self.replicas:
            restarts.add_metric([model, str(replica)], count)
            up.add_metric([model, str(replica), state], 1.0 if state == "ready" else 0.0)
        yield restarts
        yield up


class Metrics:
    """Counters and histograms of one gateway, in its own registry (several gateways may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gallama_requests", "HTTP requests by route, model and status.",
                                ["route", "model", "status"], registry=self.registry)
        self.tokens = Counter("gallama_tokens", "Tokens by model and kind (prompt, cached, generated).",
                              ["model", "kind"], registry=self.registry)
        self.first_token = Histogram("gallama_time_to_first_token_seconds",
                                     "From the request's arrival to its first generated chunk (streams).",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.gaps = Histogram("gallama_inter_token_seconds", "Gaps between a stream's generated chunks.",
                              ["model"], buckets=GAP_BUCKETS, registry=self.registry)
        self.duration = Histogram("gallama_request_duration_seconds", "From arrival to the response's end.",
                                  ["route", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe(self, record: CallRecord, duration_s: float) -> None:
        """Count one finished request (called by the request log)."""
        route = record.path if record.path in ROUTES else "other"  # unknown paths must not grow the labels
        model = record.model or ""
        self.requests.labels(route, model, str(record.status or 499)).inc()
        self.duration.labels(route, model).observe(duration_s)
        for kind, value in (("prompt", record.prompt_tokens), ("cached", record.cached_tokens),
                            ("generated", record.completion_tokens)):
            if value:
                self.tokens.labels(model, kind).inc(value)
        if record.first_token_s is not None:
            self.first_token.labels(model).observe(record.first_token_s)
        for gap in record.gaps:
            self.gaps.labels(model).observe(gap)

    def render(self, replicas: list[tuple[str, int, str, int, dict[str, Any]]]) -> bytes:
        """The exposition text: the gateway's own metrics, then the workers' as read now."""
        snapshot = CollectorRegistry()
        snapshot.register(_Snapshot(replicas))
        return generate_latest(self.registry) + generate_latest(snapshot)
