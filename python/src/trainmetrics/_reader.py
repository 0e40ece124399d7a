"""The SDK reader that keeps the network off the trainer's thread and every step out of
`otel.metric.overflow`.

Why not the SDK's `PeriodicExportingMetricReader`: it collects and exports in one step on one
thread, so a slow or down endpoint delays collections, and the SDK folds every attribute set past
its cardinality limit (one per step) into an overflow point that serve can only count as dropped.
The usual cure, `provider.force_flush()` from the trainer every N steps, exports on the
trainer's thread and blocks it for up to the export timeout when the endpoint is down.

Here collection and export are apart:
- a collect thread collects every `interval` seconds, and at once when the trainer has recorded
  `collect_every` new steps (it only sets an event: never blocks). A collection is memory work
  (tens of µs per point), so the sets held between collections stay bounded whatever the
  network does;
- collections go into a bounded queue (`max_queued_points`) that an export thread sends in
  order. A failed export stays at the head and is retried with backoff (1 s doubling to 10 s)
  while the queue has room; a collection that finds the queue full is dropped and counted
  `queue_full` (training is never blocked, and nothing is lost silently);
- shutdown collects once more and drains the queue within its timeout; what is still queued
  then is counted `shutdown_timeout`.

Temporality is delta for every instrument kind: with cumulative temporality the SDK keeps every
step's attribute set forever and re-sends it at every collection.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
    _Gauge,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from ._conventions import OVERFLOW_ATTRIBUTE, RUN_END_METRIC

log = logging.getLogger("trainmetrics")

DELTA_EVERYWHERE: dict[type, AggregationTemporality] = {
    kind: AggregationTemporality.DELTA
    for kind in (Counter, UpDownCounter, Histogram, _Gauge, ObservableCounter, ObservableUpDownCounter, ObservableGauge)
}

RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 10.0


@dataclass
class Delivery:
    """What happened to the data points this process recorded, counted by the reader.

    `sent` are points the endpoint accepted (the collector or serve answered OK); `dropped`
    maps a reason (`queue_full`, `shutdown_timeout`, `overflow`) to a count of points.
    """

    sent: int = 0
    exports: int = 0
    failed_exports: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None

    def drop(self, reason: str, points: int) -> None:
        """Adds `points` (negative: a correction) to the count of `reason`."""
        if points:
            n = self.dropped.get(reason, 0) + points
            if n:
                self.dropped[reason] = n
            else:
                self.dropped.pop(reason, None)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


def count_points(data: MetricsData) -> tuple[int, int, bool]:
    """(metric data points, of which overflow points, whether there is anything to send) in one
    collection. The run-end gauge is no metric point (serve does not count it either)."""
    points = overflow = 0
    anything = False
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                anything = True
                if metric.name == RUN_END_METRIC:
                    continue
                for dp in metric.data.data_points:
                    points += 1
                    if dp.attributes and dp.attributes.get(OVERFLOW_ATTRIBUTE):
                        overflow += 1
    return points, overflow, anything


class QueuedReader(MetricReader):
    """A `MetricReader` with its own collect and export threads (module doc).

    `interval` and `export_timeout` are seconds; `collect_every` is in steps.
    """

    def __init__(
        self,
        exporter: MetricExporter,
        *,
        interval: float = 1.0,
        collect_every: int = 2000,
        max_queued_points: int = 1_000_000,
        export_timeout: float = 10.0,
    ) -> None:
        super().__init__(preferred_temporality=DELTA_EVERYWHERE)
        self._exporter = exporter
        self._interval = interval
        self._collect_every = collect_every
        self._max_queued_points = max_queued_points
        self._export_timeout = export_timeout
        self.delivery = Delivery()
        self._queue: collections.deque[tuple[MetricsData, int]] = collections.deque()
        self._queued_points = 0
        self._cv = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stopping_export = False
        self._sets_since_collect = 0
        #: Pending sets at which the trainer collects itself (half the cardinality limit).
        self.urgent_sets = 10_000
        self._full_warned = False
        self._collect_thread = threading.Thread(target=self._collect_loop, name="trainmetrics-collect", daemon=True)
        self._export_thread = threading.Thread(target=self._export_loop, name="trainmetrics-export", daemon=True)
        self._started = False
        self._shut = False
        #: Metrics built outside the SDK (histograms, see `_run.Run.histogram`) added to each
        #: collection, with the resource they belong to.
        self.extra: Callable[[], list[Metric]] | None = None
        self.resource: Resource | None = None

    def start(self) -> None:
        """Starts both threads; call once the `MeterProvider` holds this reader."""
        if not self._started:
            self._started = True
            self._collect_thread.start()
            self._export_thread.start()

    def note_sets(self, sets: int) -> bool:
        """Called by the trainer with the number of new attribute sets it may have added to one
        stream (a new step: one per gauge; names the OTel API refuses share one gauge, so each
        of them counts). Wakes the collect thread every `collect_every` sets, and returns True
        once `urgent_sets` are pending, when the caller must collect at once (memory work, no
        network) so no stream reaches the SDK's cardinality limit. Never blocks."""
        self._sets_since_collect += sets
        if self._sets_since_collect >= self._collect_every:
            self._wake.set()
        return self._sets_since_collect >= self.urgent_sets

    def collect_now(self) -> None:
        """A collection on the caller's thread (see `note_sets`)."""
        self._collect_once()

    # -- collection ---------------------------------------------------------------------------

    def _collect_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._collect_once()

    def _collect_once(self) -> None:
        # Reset first: sets added while this collection runs belong to the next one.
        self._sets_since_collect = 0
        try:
            self.collect()
        except Exception as e:  # noqa: BLE001 - a collection error must not end the thread
            log.warning("trainmetrics: collection failed: %r", e)

    def _with_extra(self, data: MetricsData) -> MetricsData:
        extra = self.extra() if self.extra is not None else []
        if not extra:
            return data
        scope = ScopeMetrics(scope=InstrumentationScope("trainmetrics"), metrics=extra, schema_url="")
        rms = list(data.resource_metrics)
        if rms:
            # Into the SDK's own scope of that name when there is one: the OTLP encoder keys
            # scopes by their identity, so a second equal scope would replace the first.
            scopes = list(rms[0].scope_metrics)
            same = [i for i, sm in enumerate(scopes) if sm.scope == scope.scope]
            if same:
                sm = scopes[same[0]]
                scopes[same[0]] = ScopeMetrics(scope=sm.scope, metrics=[*sm.metrics, *extra], schema_url=sm.schema_url)
            else:
                scopes.append(scope)
            rms[0] = ResourceMetrics(resource=rms[0].resource, scope_metrics=scopes, schema_url=rms[0].schema_url)
        else:
            rms = [ResourceMetrics(resource=self.resource or Resource.create({}), scope_metrics=[scope], schema_url="")]
        return MetricsData(resource_metrics=rms)

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        metrics_data = self._with_extra(metrics_data)
        points, overflow, anything = count_points(metrics_data)
        if not anything:
            return
        with self._cv:
            # Overflow points carry no step: serve can only count them; say so here too.
            self.delivery.drop("overflow", overflow)
            if self._queue and self._queued_points + points > self._max_queued_points:
                self.delivery.drop("queue_full", points)
                if not self._full_warned:
                    self._full_warned = True
                    log.warning(
                        "trainmetrics: %d data points wait for the endpoint (%s); dropping new collections, counted queue_full",
                        self._queued_points,
                        self.delivery.last_error,
                    )
                return
            self._queue.append((metrics_data, points))
            self._queued_points += points
            self._cv.notify_all()

    # -- export -------------------------------------------------------------------------------

    def _export_loop(self) -> None:
        backoff = RETRY_INITIAL_S
        while True:
            with self._cv:
                while not self._queue and not self._stopping_export:
                    self._cv.wait()
                if not self._queue:
                    return
                data, points = self._queue[0]
            try:
                result = self._exporter.export(data, timeout_millis=self._export_timeout * 1e3)
                error = None if result is MetricExportResult.SUCCESS else "export failed"
            except Exception as e:  # noqa: BLE001 - an exporter bug must not end the thread
                error = repr(e)
            with self._cv:
                self.delivery.exports += 1
                # Shutdown may have given up on this batch (counted it) while it was in flight.
                ours = bool(self._queue) and self._queue[0][0] is data
                if error is None:
                    if ours:
                        self._queue.popleft()
                        self._queued_points -= points
                        self.delivery.sent += points
                    else:
                        self.delivery.drop("shutdown_timeout", -points)
                        self.delivery.sent += points
                    if self.delivery.last_error is not None:
                        log.info("trainmetrics: the endpoint takes data again")
                    self.delivery.last_error = None
                    self._full_warned = False
                    backoff = RETRY_INITIAL_S
                    self._cv.notify_all()
                    continue
                self.delivery.failed_exports += 1
                if self.delivery.last_error is None:
                    log.warning("trainmetrics: export of %d data points failed (%s); retrying", points, error)
                self.delivery.last_error = error
                self._cv.notify_all()
                # Wait out the backoff; once shutdown begins its deadline decides, so retry soon.
                if self._stopping_export:
                    self._cv.wait(min(backoff, 0.5))
                else:
                    self._cv.wait_for(lambda: self._stopping_export, backoff)
            backoff = min(backoff * 2, RETRY_MAX_S)

    # -- flush and shutdown -------------------------------------------------------------------

    def drain(self, timeout: float) -> bool:
        """Collects now and waits up to `timeout` seconds until everything collected was sent."""
        self._collect_once()
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def abandon(self) -> None:
        """Gives up on what is still queued (a shutdown that was interrupted or failed): counted
        `shutdown_timeout`, never lost silently. Idempotent."""
        self._stop.set()
        self._wake.set()
        with self._cv:
            self._stopping_export = True
            if self._queue:
                self.delivery.drop("shutdown_timeout", sum(p for _, p in self._queue))
                self._queue.clear()
                self._queued_points = 0
            self._cv.notify_all()

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.drain(timeout_millis / 1e3)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Stops collecting, sends what is queued within the timeout and counts the rest
        `shutdown_timeout`. Idempotent."""
        if self._shut:
            return
        self._shut = True
        deadline = time.monotonic() + timeout_millis / 1e3
        self._stop.set()
        self._wake.set()
        if self._started:
            self._collect_thread.join(max(deadline - time.monotonic(), 0))
        self._collect_once()
        with self._cv:
            self._stopping_export = True
            self._cv.notify_all()
            while self._queue and time.monotonic() < deadline:
                self._cv.wait(max(deadline - time.monotonic(), 0.01))
            if self._queue:
                left = sum(p for _, p in self._queue)
                self.delivery.drop("shutdown_timeout", left)
                log.warning(
                    "trainmetrics: %d data points not sent within the shutdown timeout (%s)", left, self.delivery.last_error
                )
                self._queue.clear()
                self._queued_points = 0
                self._cv.notify_all()
        if self._started:
            self._export_thread.join(max(deadline - time.monotonic(), 0.1))
        try:
            self._exporter.shutdown(timeout_millis=max(deadline - time.monotonic(), 0.1) * 1e3)
        except Exception as e:  # noqa: BLE001
            log.warning("trainmetrics: exporter shutdown failed: %r", e)
