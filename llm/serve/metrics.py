"""Prometheus metrics of the server (`/metrics`): requests by route and status, prompt and
generated tokens, generation throughput, queue depth, busy slots, and histograms of time to first
token, inter-token latency and request latency. One registry per app, so tests can run several."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from llm.serve.engine import compilation_cache_stats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """Counters fed by the server (requests) and the engine thread (tokens, timings)."""

    content_type = CONTENT_TYPE_LATEST
    routes = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                        "/metrics", "/tokenize", "/detokenize", "/tokenizer_info"})

    def __init__(self, engine):
        self.engine = engine
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llm_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("llm_generated_tokens", "tokens generated", registry=r)
        self.finished = Counter("llm_engine_requests_finished", "engine requests by finish reason",
                                ["reason"], registry=r)
        self.tokens_per_second = Gauge("llm_generation_tokens_per_second",
                                       "generated tokens per second over the last second",
                                       registry=r)
        Gauge("llm_queue_depth", "requests waiting for a slot", registry=r).set_function(
            engine.queue_depth)
        Gauge("llm_active_slots", "decode slots holding a request", registry=r).set_function(
            engine.active_slots)
        Gauge("llm_slots", "decode slots", registry=r).set(len(engine.slots))
        Gauge("llm_engine_compiled_programs", "XLA programs the engine has compiled (prefill "
              "and decode buckets met so far)", registry=r).set_function(engine.compiled_shapes)
        Gauge("llm_engine_warmup_pending", "programs queued by the background warm-up and "
              "not yet compiled", registry=r).set_function(engine.warm_pending)
        Gauge("llm_engine_compile_step_seconds", "wall time of the engine steps that compiled "
              "a program", registry=r).set_function(lambda: engine.stats["compile_seconds"])
        Gauge("llm_compilation_cache_hits", "programs this process loaded from JAX's "
              "persistent compilation cache", registry=r).set_function(
                  lambda: compilation_cache_stats["hits"])
        Gauge("llm_compilation_cache_misses", "programs this process compiled while the "
              "persistent compilation cache was on", registry=r).set_function(
                  lambda: compilation_cache_stats["misses"])
        self.ttft = Histogram("llm_time_to_first_token_seconds", "arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llm_inter_token_latency_seconds", "time between two tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("llm_request_latency_seconds", "arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self._seen: dict[int, tuple[int, float | None]] = {}  # id -> (tokens counted, time)
        # Where latency outliers come from: event-loop stalls (the loop is late to wake up) and
        # Python garbage-collection pauses (process-wide, any thread).
        self.loop_lag = Histogram("llm_event_loop_lag_seconds", "how late the server's event "
                                  "loop woke from a 50 ms sleep", buckets=_LATENCY_BUCKETS,
                                  registry=r)
        self.gc_pause = Histogram("llm_gc_pause_seconds", "Python garbage-collection pauses",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start:
            self.gc_pause.observe(time.perf_counter() - self._gc_start)

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def on_submit(self, reqs) -> None:
        for r in reqs:
            self.prompt_tokens.inc(len(r.prompt))

    def on_event(self, req, kind: str) -> None:
        """Called from the engine thread for every engine event of a request. The engine decodes
        several tokens per call and announces them together ("token" once per call), so the
        tokens counted are those new since the request's previous event; the inter-token latency
        observed is the gap between deliveries, once per token (0 for the rest of a burst)."""
        now = time.monotonic()
        counted, last = self._seen.get(req.id, (0, None))
        new = len(req.output) - counted
        if kind != "token" and req.finish_reason in ("cancelled", "error"):
            new = 0
        if new > 0:
            self.generated_tokens.inc(new)
            if last is None:
                self.ttft.observe(now - req.arrival)
            else:
                self.itl.observe(now - last)
            for _ in range(new - 1):
                self.itl.observe(0.0)
            counted, last = counted + new, now
        if kind == "token":
            self._seen[req.id] = (counted, last)
            return
        self._seen.pop(req.id, None)
        self.finished.labels(req.finish_reason).inc()
        self.latency.observe(now - req.arrival)

    async def sample_forever(self, period: float = 1.0, tick: float = 0.05) -> None:
        """Update the tokens/s gauge every `period` seconds; every `tick` observe the loop lag."""
        last_n, last_t = self.engine.stats["generated_tokens"], time.monotonic()
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick)
            t = time.monotonic()
            self.loop_lag.observe(max(0.0, t - before - tick))
            if t - last_t >= period:
                n = self.engine.stats["generated_tokens"]
                self.tokens_per_second.set((n - last_n) / (t - last_t))
                last_n, last_t = n, t

    def render(self) -> bytes:
        return generate_latest(self.registry)
