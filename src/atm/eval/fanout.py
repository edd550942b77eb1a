"""One model behind several endpoints: ``--model openai:NAME@URL1,URL2,...``.

A cluster user runs one engine per GPU (or per node) and hands ATM their URLs. ``FanOut`` is a
provider over one single-endpoint provider per URL. Each endpoint gets ``--concurrency`` worker
threads (its bounded number of requests in flight); every worker takes the next item from one
shared queue, so items go to whichever endpoint has a free slot and a fast endpoint answers more
than a slow one. Results are yielded as they arrive and the harness writes each to the same
per-item file as any other provider (resumable the same way); every record names the endpoint
that answered it (``extra.endpoint``, lifted to the record's ``endpoint`` by ``atm.eval.rundir``).

A failed request (timeout, dropped connection, 5xx, 429: the provider's ``Transient``) puts the
item back at the front of the queue and takes its endpoint out for a cool-down that doubles with
each consecutive failure; after it, one request probes the endpoint again (success brings back all
its workers). A failure counts against the item's retry budget (``generation.retries``) unless
its endpoint was already known to be down and another endpoint was up: probing a dead endpoint
costs the item nothing, so a killed endpoint's items finish on the others. When every endpoint
has failed more than ``retries`` times in a row, the items still queued are recorded as failures
(kept, counted invalid; ``--retry-failed`` asks again) instead of waiting forever. A request
refused for what it is (4xx) is recorded at once, like the single-endpoint provider does.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Iterator, Sequence

from atm.errors import AtmError
from atm.eval.providers import GenerationSpec, Prediction, Provider, Transient

log = logging.getLogger(__name__)

MAX_COOLDOWN = 15.0  # seconds between probes of an endpoint that keeps failing


class _Endpoint:
    def __init__(self, provider: Provider):
        self.provider = provider
        self.name = str(getattr(provider, "base_url", None) or provider.spec)
        self.failures = 0  # consecutive failed requests (0: up)
        self.down_until = 0.0  # monotonic time of the next probe while down
        self.probing = False  # one request is testing the endpoint
        self.answered = 0
        self.failed_requests = 0
        self.last_error: str | None = None


class _Job:
    def __init__(self, item: dict):
        self.item = item
        self.requests = 0  # requests made for this item, on any endpoint
        self.counted = 0  # failures counted against the retry budget
        self.errors: list[str] = []


class FanOut(Provider):
    """``spec`` served by ``endpoints`` (one single-endpoint provider each, e.g. ``OpenAIProvider``)."""

    retries_requests = True  # each item's failures are retried here, on the endpoints, within its budget

    def __init__(self, spec: str, endpoints: Sequence[Provider], **options: Any):
        super().__init__(spec, spec.partition(":")[2], **options)
        if len(endpoints) < 2:
            raise AtmError(f"{spec}: a fan-out needs at least two endpoints")
        self.endpoints = [_Endpoint(p) for p in endpoints]
        self.concurrency = max(1, int(options.get("concurrency") or 1))  # per endpoint
        gen = options.get("generation") or {}
        self.gen = gen if isinstance(gen, GenerationSpec) else GenerationSpec(**gen)
        self.supports_loglik = all(p.supports_loglik for p in endpoints)
        self.batch_size = 8 * self.concurrency * len(self.endpoints)

    @property
    def mode_note(self) -> str | None:  # type: ignore[override]
        notes = [n for e in self.endpoints for n in [getattr(e.provider, "mode_note", None)] if n]
        return "; ".join(dict.fromkeys(notes)) or None

    # ------------------------------------------------------------ dispatch
    def predict_iter(self, items: Sequence[dict], mode: str = "generate") -> Iterator[Prediction]:
        if not items:
            return
        run = _Dispatch(self, items, mode)
        threads = [threading.Thread(target=run.worker, args=(ep,), daemon=True,
                                    name=f"fanout-{k}-{j}")
                   for k, ep in enumerate(self.endpoints) for j in range(self.concurrency)]
        for t in threads:
            t.start()
        try:
            got = 0
            while got < len(items):
                try:
                    pred = run.results.get(timeout=0.5)
                except queue.Empty:
                    if run.error is not None:
                        raise run.error
                    if not any(t.is_alive() for t in threads):
                        raise AtmError(f"{self.spec}: every endpoint worker stopped with "
                                       f"{len(items) - got} items unanswered")
                    continue
                got += 1
                yield pred
            if run.error is not None:
                raise run.error
        finally:
            run.stop()

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "fan_out": True, "concurrency_per_endpoint": self.concurrency,
                "endpoints": [{"endpoint": e.name, "answered": e.answered, "failed_requests": e.failed_requests,
                               "last_error": e.last_error, **e.provider.describe()} for e in self.endpoints]}

    def close(self) -> None:
        for e in self.endpoints:
            e.provider.close()


class _Dispatch:
    """One ``predict_iter`` call: the shared queue, the workers' loop and the results channel."""

    def __init__(self, fan: FanOut, items: Sequence[dict], mode: str):
        self.fan = fan
        self.mode = mode
        self.queue: deque[_Job] = deque(_Job(it) for it in items)
        self.remaining = len(items)  # items without a result yet
        self.cond = threading.Condition()
        self.results: queue.Queue[Prediction] = queue.Queue()
        self.error: BaseException | None = None
        self._stopped = False
        self.retries = int(fan.gen.retries)
        self.backoff = max(0.05, float(fan.gen.backoff))

    def stop(self) -> None:
        with self.cond:
            self._stopped = True
            self.cond.notify_all()

    def _emit(self, pred: Prediction) -> None:  # under the lock
        self.remaining -= 1
        self.results.put(pred)

    def _all_given_up(self) -> bool:
        return all(e.failures > self.retries for e in self.fan.endpoints)

    def _give_up_queued(self) -> None:  # under the lock: every endpoint is down past its budget
        why = "; ".join(f"{e.name}: {e.last_error}" for e in self.fan.endpoints)
        while self.queue:
            job = self.queue.popleft()
            self._emit(_failed(job, f"all {len(self.fan.endpoints)} endpoints failing ({why})"))

    def _next(self, ep: _Endpoint) -> tuple[_Job, bool, bool] | None:
        """Block until ``ep`` may send a request: (job, is a probe, another endpoint is up); None to stop."""
        with self.cond:
            while True:
                if self._stopped or self.remaining <= 0:
                    return None
                if ep.failures:
                    if self._all_given_up() and self.queue:
                        self._give_up_queued()
                        self.cond.notify_all()
                        continue
                    wait = ep.down_until - time.monotonic()
                    if ep.probing or wait > 0:
                        self.cond.wait(timeout=max(0.01, wait) if not ep.probing else 1.0)
                        continue
                if not self.queue:
                    self.cond.wait(timeout=1.0)
                    continue
                job = self.queue.popleft()
                probe = ep.failures > 0
                if probe:
                    ep.probing = True
                others_up = any(e.failures == 0 for e in self.fan.endpoints if e is not ep)
                return job, probe, others_up

    def worker(self, ep: _Endpoint) -> None:
        try:
            while True:
                nxt = self._next(ep)
                if nxt is None:
                    return
                job, probe, others_up = nxt
                t0 = time.perf_counter()
                err: str | None = None
                pred: Prediction | None = None
                try:
                    pred = ep.provider.attempt(job.item, self.mode)  # type: ignore[attr-defined]
                except Transient as exc:
                    err = str(exc)
                except AtmError:
                    raise
                except Exception as exc:  # noqa: BLE001 - refused for what it is (4xx): recorded, not retried
                    pred = Prediction(id=job.item["id"], valid=False,
                                      reason=f"request failed: {type(exc).__name__}: {exc}"[:500],
                                      latency=time.perf_counter() - t0, extra={"failed": True})
                self._done(ep, job, pred, err, probe, others_up)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            with self.cond:
                if self.error is None:
                    self.error = exc
                self._stopped = True
                self.cond.notify_all()

    def _done(self, ep: _Endpoint, job: _Job, pred: Prediction | None, err: str | None,
              probe: bool, others_up: bool) -> None:
        with self.cond:
            job.requests += 1
            ep.probing = False
            if pred is not None:
                if ep.failures:
                    log.info("%s: endpoint %s answers again", self.fan.spec, ep.name)
                ep.failures, ep.down_until = 0, 0.0
                ep.answered += 1
                pred.extra["endpoint"] = ep.name
                pred.extra["attempts"] = job.requests
                self._emit(pred)
            else:
                ep.failures += 1
                ep.failed_requests += 1
                ep.last_error = (err or "")[:300]
                ep.down_until = time.monotonic() + min(MAX_COOLDOWN, self.backoff * 2 ** (ep.failures - 1))
                if ep.failures == 1:
                    log.info("%s: endpoint %s failed (%s); its items go to the others", self.fan.spec,
                             ep.name, ep.last_error)
                if not (probe and others_up):
                    job.counted += 1
                job.errors.append(f"{ep.name}: {ep.last_error}")
                if job.counted > self.retries:
                    self._emit(_failed(job, "; ".join(job.errors[-3:])))
                else:
                    self.queue.appendleft(job)
            self.cond.notify_all()


def _failed(job: _Job, why: str) -> Prediction:
    return Prediction(id=job.item["id"], valid=False, reason=f"request failed: {why}"[:500],
                      extra={"failed": True, "attempts": job.requests})
