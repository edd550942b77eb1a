"""The Prometheus metrics of one ``atm serve`` app (requests, latency, tokens, advice, engines)."""

from __future__ import annotations

from typing import Any


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("atm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("atm_request_errors", "requests answered with an error status", ["route", "status"], registry=r)
        self.latency = Histogram("atm_request_latency_seconds", "request latency (to the last byte)",
                                 ["route"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("atm_time_to_first_token_seconds", "streaming: time to the first chunk",
                              ["model"], registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.prompt_tokens = Counter("atm_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.gen_tokens = Counter("atm_generated_tokens", "tokens generated", ["model"], registry=r)
        self.advice = Counter("atm_advice", "advice answers by validity and class", ["model", "advice"], registry=r)
        self.inflight = Gauge("atm_engine_inflight", "requests inside each engine", ["model"], registry=r)
        self.ready = Gauge("atm_engine_ready", "1 when the model's engine is ready", ["model"], registry=r)
        self.restarts = Gauge("atm_engine_restarts", "engine process restarts", ["model"], registry=r)
        self.disconnects = Counter("atm_client_disconnects", "generations cancelled because the client left", ["route"], registry=r)

    def usage(self, model: str, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        p, c = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        if p:
            self.prompt_tokens.labels(model).inc(p)
        if c:
            self.gen_tokens.labels(model).inc(c)
