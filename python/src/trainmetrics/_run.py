"""`init()` and `Run`: one training run's metrics through an OTel `MeterProvider` of its own.

The provider is never the global one (MLflow tracing and other libraries set that). Its
resource is the run (`ml.experiment.name`, `ml.run.name`, `ml.run.id`, `ml.param.*`, the tags,
and the rank of a distributed job); every value is a gauge point with the attributes `step` and
`trainmetrics.time_unix_nano`, following the conventions of `_conventions.py`. The reader
(`_reader.QueuedReader`) collects and exports off the trainer's thread with delta temporality.
"""

from __future__ import annotations

import atexit
import bisect
import datetime
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import types
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # 3.10: typing_extensions comes with opentelemetry-api
    from typing_extensions import Unpack

from opentelemetry.sdk.metrics import MeterProvider, _Gauge
from opentelemetry.sdk.metrics.export import AggregationTemporality, HistogramDataPoint, Metric, MetricExporter
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource

from . import _conventions as c
from . import _embedded
from ._reader import Delivery, QueuedReader
from .errors import ConfigError

log = logging.getLogger("trainmetrics")

#: Attribute sets one stream may hold per collection. The collect thread collects every
#: `collect_every` new steps (default 2000), a tenth of this.
CARDINALITY_LIMIT = 20_000
#: OTLP requests of at most this many points (the gRPC default message limit is 4 MiB; a gauge
#: point with its attributes is under 100 bytes).
MAX_EXPORT_BATCH_POINTS = 8192


@dataclass
class RunSummary:
    """What `finish()` reports: the run, its end status, and what happened to its points.

    `recorded` counts values given to `log`/`histogram`; `sent` the data points the endpoint
    accepted; `dropped` points not sent, by reason (`queue_full`, `shutdown_timeout`,
    `overflow`) and values refused before they became points (`invalid_value`,
    `invalid_step`, `invalid_name`, `after_finish`). `tensorboard_dir` and `mlflow_url` are
    filled when known (the embedded default knows its logdir; MLflow needs its tracking URI).
    `serve_report` is the embedded serve's shutdown report when this run stopped it.
    """

    run_id: str
    run_name: str
    experiment: str | None
    status: str
    endpoint: str
    recorded: int
    sent: int
    dropped: dict[str, int]
    tensorboard_dir: Path | None = None
    mlflow_url: str | None = None
    serve_report: str | None = None
    finish_seconds: float = 0.0

    def text(self) -> str:
        """The lines `finish()` prints."""
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "0"
        lines = [
            f"trainmetrics: run {self.run_name} (id {self.run_id}) {self.status} in {self.finish_seconds:.2f}s; "
            f"{self.recorded} values recorded, {self.sent} data points sent to {self.endpoint}, dropped {dropped}",
        ]
        if self.tensorboard_dir is not None:
            lines.append(f"  tensorboard: {self.tensorboard_dir} (view: tensorboard --logdir {self.tensorboard_dir.parent})")
        if self.mlflow_url is not None:
            lines.append(f"  mlflow: {self.mlflow_url}")
        if self.serve_report:
            lines.extend("  " + line for line in self.serve_report.splitlines())
        return "\n".join(lines)


class _Instrument:
    """A gauge of one name, and the last (step, value) sent on it."""

    __slots__ = ("gauge", "named", "last_step", "last_value")

    def __init__(self, gauge: Any, named: bool) -> None:
        self.gauge = gauge
        self.named = named
        self.last_step: int | None = None
        self.last_value = 0.0


@dataclass
class _Refusals:
    counts: dict[str, int] = field(default_factory=dict)
    warned: set[tuple[str, str]] = field(default_factory=set)

    def add(self, reason: str, subject: str, message: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        if (reason, subject) not in self.warned and len(self.warned) < 100:
            self.warned.add((reason, subject))
            log.warning("trainmetrics: %s (counted %s)", message, reason)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings become dotted keys; values become text as MLflow stores params (floats by
    `repr`, the shortest form that reads back exactly)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, float):
            out[key] = repr(v)
        elif isinstance(v, (str, int, bool)) or v is None:
            out[key] = str(v)
        else:
            try:
                out[key] = json.dumps(v, default=str)
            except (TypeError, ValueError):
                out[key] = str(v)
    return out


def _as_floats(name: str, values: Any, refused: _Refusals) -> Any:
    """`values` as a flat float64 numpy array when numpy is there (torch tensors of any dtype,
    bfloat16 included, numpy arrays, sequences), else a list of floats; None when they are not
    numbers (counted `invalid_value`)."""
    flat: Any = values
    if values is None or isinstance(values, (str, bytes)):
        refused.add("invalid_value", name, f"{name}: histogram values must be numbers, not {type(values).__name__}")
        return None
    if hasattr(flat, "detach") and hasattr(flat, "float"):  # a torch tensor: numpy has no bfloat16
        flat = flat.detach().float().cpu().numpy()
    try:
        import numpy as np
    except ImportError:
        np = None  # type: ignore[assignment]
    if np is not None:
        try:
            arr = np.asarray(flat)
        except (TypeError, ValueError, OverflowError):
            arr = None
        # Only numeric arrays: numpy would turn None into NaN and fail on strings; other
        # contents go through the per-value path, which counts each bad one.
        if arr is not None and arr.dtype.kind in "biuf":
            return arr.astype(np.float64, copy=False).ravel()
    if isinstance(flat, (str, bytes)) or not hasattr(flat, "__iter__"):
        refused.add("invalid_value", name, f"{name}: histogram values must be an iterable of numbers, not {type(values).__name__}")
        return None
    out: list[float] = []
    for value in flat:
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            out.append(float(value))
        except (TypeError, ValueError, OverflowError):
            refused.add("invalid_value", name, f"{name}: a histogram value {str(value)[:40]!r} is not a number")
    return out


def _histogram_point(name: str, values: Iterable[Any], step: int, buckets: int, refused: _Refusals) -> HistogramDataPoint | None:
    """One OTLP explicit-bucket histogram point of `values`: bucket i holds (bounds[i-1],
    bounds[i]] as OTLP defines them, the bounds splitting [min, max] into `buckets` equal parts.
    With numpy the buckets are counted in C (a 10M-element tensor in well under a second)."""
    vs = _as_floats(name, values, refused)
    if vs is None:
        return None
    if isinstance(vs, list):
        finite = [v for v in vs if math.isfinite(v)]
        nonfinite = len(vs) - len(finite)
        if not finite:
            _count_nonfinite(name, nonfinite, refused)
            return None
        lo, hi, n, total = min(finite), max(finite), len(finite), math.fsum(finite)
        bounds = _bounds(lo, hi, buckets)
        counts = [0] * (len(bounds) + 1)
        for v in finite:
            counts[bisect.bisect_left(bounds, v)] += 1
    else:
        import numpy as np

        mask = np.isfinite(vs)
        nonfinite = int(vs.size - np.count_nonzero(mask))
        fin = vs[mask] if nonfinite else vs
        if fin.size == 0:
            _count_nonfinite(name, nonfinite, refused)
            return None
        lo, hi, n, total = float(fin.min()), float(fin.max()), int(fin.size), float(np.sum(fin))
        bounds = _bounds(lo, hi, buckets)
        counts = np.bincount(np.searchsorted(np.asarray(bounds), fin, side="left"), minlength=len(bounds) + 1).tolist()
    _count_nonfinite(name, nonfinite, refused)
    now = time.time_ns()
    # The point's own time is its record time: no time attribute needed.
    attrs: dict[str, Any] = {c.STEP_ATTRIBUTE: step}
    if c.INSTRUMENT_NAME.fullmatch(name) is None:
        attrs[c.NAME_ATTRIBUTE] = name
    return HistogramDataPoint(
        attributes=attrs, start_time_unix_nano=now, time_unix_nano=now, count=n, sum=total,
        bucket_counts=counts, explicit_bounds=bounds, min=lo, max=hi,
    )  # fmt: skip


def _bounds(lo: float, hi: float, buckets: int) -> list[float]:
    # Interpolated as lo*(1-t) + hi*t: `hi - lo` overflows to inf for [-1e308, 1e308].
    if not hi > lo:
        return []
    out = [lo * (1 - k / buckets) + hi * (k / buckets) for k in range(1, buckets)]
    # Strictly increasing, as OTLP requires; equal neighbours (a range of a few ulps) go.
    return [b for i, b in enumerate(out) if i == 0 or b > out[i - 1]]


def _count_nonfinite(name: str, n: int, refused: _Refusals) -> None:
    if n:
        refused.add("nonfinite_histogram_value", name, f"{name}: NaN/Inf histogram values are left out", n)


def _world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, DeepSpeed, Lightning, SLURM
    via torchrun all set `RANK` and `WORLD_SIZE`); (0, 1) outside a distributed job."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError as e:
        raise ConfigError(f"RANK / WORLD_SIZE are not integers: {e}") from e
    return rank, world


def _shared_identity(run_id: str | None, run_name: str | None) -> tuple[str, str]:
    """The run id and name every rank of a job must share: broadcast from rank 0 when
    `torch.distributed` is initialized, else derived from torchrun's `TORCHELASTIC_RUN_ID`."""
    name = run_name or "run-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if run_id is not None:
        return run_id, name
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        box: list[Any] = [(uuid.uuid4().hex, name)]
        dist.broadcast_object_list(box, src=0)
        rid, rname = box[0]
        return str(rid), str(rname)
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if elastic and elastic != "none":
        return elastic, run_name or f"run-{elastic[:8]}"
    raise ConfigError(
        "a distributed job (WORLD_SIZE > 1) needs one run id for every rank: call init() after "
        "torch.distributed.init_process_group, run under torchrun --standalone (TORCHELASTIC_RUN_ID), "
        "or set TRAINMETRICS_RUN_ID"
    )


def _mlflow_run_key(mlflow_run_id: str, tracking_uri: str | None) -> str:
    """The run key (`trainmetrics.run_key` tag) of an existing MLflow run, so MLFLOW_RUN_ID
    continues that run; the id itself when the run or the server is unknown."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        try:
            q = urllib.parse.urlencode({"run_id": mlflow_run_id})
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/runs/get?{q}", timeout=5) as r:
                tags = json.load(r)["run"]["data"].get("tags", [])
            for t in tags:
                if t.get("key") == "trainmetrics.run_key":
                    return str(t["value"])
        except (OSError, ValueError, KeyError) as e:
            log.warning("trainmetrics: MLFLOW_RUN_ID=%s: could not read its run key (%r); using the id as run id", mlflow_run_id, e)
    return mlflow_run_id


def _build_exporter(endpoint: str | None, headers: Mapping[str, str] | None, protocol: str | None = None) -> tuple[MetricExporter, str]:
    """The OTLP exporter for `endpoint` (None: the OTel environment variables decide), and the
    endpoint it sends to, for messages. Protocol from `OTEL_EXPORTER_OTLP_METRICS_PROTOCOL` /
    `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the OTel default, or `grpc`)."""
    from ._reader import DELTA_EVERYWHERE

    protocol = (
        protocol or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    ).strip()
    hdrs = dict(headers) if headers else None
    if protocol == "grpc":
        try:
            from grpc import Compression  # type: ignore[import-untyped]
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
        except ImportError as e:
            raise ConfigError("OTLP protocol grpc needs the grpc exporter: pip install 'trainmetrics[grpc]'") from e
        grpc_exporter = GrpcExporter(
            endpoint=endpoint,
            headers=hdrs,
            compression=Compression.Gzip,
            preferred_temporality=DELTA_EVERYWHERE,
            max_export_batch_size=MAX_EXPORT_BATCH_POINTS,
        )
        shown = endpoint or getattr(grpc_exporter, "_endpoint", None) or "the OTLP/gRPC endpoint"
        return grpc_exporter, str(shown)
    if protocol != "http/protobuf":
        raise ConfigError(f"OTLP protocol {protocol!r} is not supported: use http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    url = endpoint
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"endpoint {endpoint!r}: expected http(s)://host:port[/path]")
        if parts.path in ("", "/"):
            url = url.rstrip("/") + "/v1/metrics"
    http_exporter = HttpExporter(
        endpoint=url,
        headers=hdrs,
        compression=HttpCompression.Gzip,
        preferred_temporality=DELTA_EVERYWHERE,
    )
    return http_exporter, str(getattr(http_exporter, "_endpoint", url))


def _endpoint_configured() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


class RunOptions(TypedDict, total=False):
    """The keywords of `init` besides the experiment and run name (documented there)."""

    run_id: str | None
    params: Mapping[str, Any] | None
    tags: Mapping[str, str] | None
    endpoint: str | None
    headers: Mapping[str, str] | None
    protocol: str | None
    rank: int | None | str
    logdir: str | os.PathLike[str]
    tracking_uri: str | None
    export_interval: float
    collect_every: int
    max_queued_points: int
    timeout: float
    exporter: MetricExporter | None
    print_summary: bool
    record_time: bool


class Run:
    """One training run. Create it with `trainmetrics.init()`.

    `log` and `histogram` are cheap and never wait for the network; `finish` (or leaving the
    `with` block) ends the run within its timeout. Thread-safe as the OTel SDK is; one `Run`
    per run.
    """

    def __init__(self, experiment: str | None = None, run_name: str | None = None, **options: Unpack[RunOptions]) -> None:
        unknown = sorted(set(options) - set(RunOptions.__annotations__))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see trainmetrics.init")
        o = options
        run_id, params, tags = o.get("run_id"), o.get("params"), o.get("tags")
        endpoint, headers, protocol = o.get("endpoint"), o.get("headers"), o.get("protocol")
        rank, logdir, tracking_uri = o.get("rank", "auto"), o.get("logdir", "runs"), o.get("tracking_uri")
        export_interval, collect_every = o.get("export_interval", 1.0), o.get("collect_every", 2000)
        max_queued_points, timeout = o.get("max_queued_points", 1_000_000), o.get("timeout", 10.0)
        exporter, print_summary, record_time = o.get("exporter"), o.get("print_summary", True), o.get("record_time", False)
        if not (isinstance(export_interval, (int, float)) and math.isfinite(export_interval) and export_interval > 0):
            raise ConfigError(f"export_interval must be a positive number of seconds, got {export_interval!r}")
        if not (isinstance(collect_every, int) and 1 <= collect_every <= CARDINALITY_LIMIT // 2):
            raise ConfigError(f"collect_every must be an int in 1..{CARDINALITY_LIMIT // 2}, got {collect_every!r}")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self._timeout = float(timeout)
        self._record_time = bool(record_time)
        self._print = print_summary
        self._tracking_uri = tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI") or None

        if rank == "auto":
            env_rank, world = _world()
            self.rank: int | None = env_rank if world > 1 else None
        elif rank is None or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0):
            self.rank = rank
        else:
            raise ConfigError(f"rank must be 'auto', None or an int >= 0, got {rank!r}")

        run_id = run_id or os.environ.get("TRAINMETRICS_RUN_ID") or None
        if run_id is None and os.environ.get("MLFLOW_RUN_ID"):
            run_id = _mlflow_run_key(os.environ["MLFLOW_RUN_ID"], self._tracking_uri)
        if self.rank is not None:
            run_id, run_name = _shared_identity(run_id, run_name)
        self.run_id: str = run_id or uuid.uuid4().hex
        self.run_name: str = run_name or "run-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.experiment: str | None = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or None
        self.params: dict[str, str] = _flatten(params or {})

        self._serve: _embedded.EmbeddedServe | None = None
        if exporter is not None:
            self.endpoint = type(exporter).__name__
        elif endpoint is None and not _endpoint_configured():
            tracking = self._tracking_uri
            if tracking and not tracking.startswith(("http://", "https://")):
                log.warning("trainmetrics: MLFLOW_TRACKING_URI=%s is not an http(s) server; the embedded serve writes TensorBoard only", tracking)
                tracking = None
            self._serve = _embedded.acquire(logdir, tracking)
            self._tracking_uri = tracking
            endpoint = self._serve.http_endpoint
            protocol = "http/protobuf"
        if exporter is None:
            exporter, self.endpoint = _build_exporter(endpoint, headers, protocol)

        attributes: dict[str, Any] = {c.RUN_ID_KEY: self.run_id, c.RUN_NAME_KEY: self.run_name}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "trainmetrics-python"
        if self.experiment is not None:
            attributes[c.EXPERIMENT_KEY] = self.experiment
        for k, v in (tags or {}).items():
            attributes[str(k)] = str(v)
        attributes.update({c.PARAM_PREFIX + k: v for k, v in self.params.items()})
        if self.rank is not None:
            attributes[c.RANK_KEY] = self.rank

        self._reader = QueuedReader(
            exporter,
            interval=float(export_interval),
            collect_every=collect_every,
            max_queued_points=max_queued_points,
        )
        # Resource.create adds telemetry.sdk.* and OTEL_RESOURCE_ATTRIBUTES; ours win.
        resource = Resource.create(attributes)
        self._provider = MeterProvider(
            metric_readers=[self._reader],
            resource=resource,
            views=[View(instrument_type=_Gauge, aggregation_cardinality_limit=CARDINALITY_LIMIT)],
            shutdown_on_exit=False,
        )
        self._pending_histograms: list[tuple[str, HistogramDataPoint]] = []
        self._hist_lock = threading.Lock()
        self._reader.extra = self._take_histograms
        self._reader.resource = resource
        self._reader.start()
        self._meter = self._provider.get_meter("trainmetrics")
        self._gauges: dict[str, _Instrument] = {}
        self._refused = _Refusals()
        self._recorded = 0
        self._next_step = 0
        self._last_step: int | None = None
        self._fresh = False
        self._lock = threading.Lock()
        self._record_lock = threading.Lock()
        self._summary: RunSummary | None = None
        self._closing = False
        self._end_sent = False
        self._killed = False
        self._pid = os.getpid()
        self._prev_sigterm: Any = None
        self._install_handlers()

    # -- recording ----------------------------------------------------------------------------

    def _step(self, step: Any) -> int | None:
        if step is None:
            s = self._next_step
        elif isinstance(step, bool):
            self._refused.add("invalid_step", "type", f"step {step!r} is a bool, not an int")
            return None
        elif isinstance(step, int):
            s = step
        elif isinstance(step, float) and step.is_integer():
            s = int(step)
        else:
            try:
                s = int(step.__index__())  # numpy and torch integers
            except (AttributeError, TypeError, ValueError):
                self._refused.add("invalid_step", "type", f"step {step!r} is not an int")
                return None
        if not 0 <= s <= c.MAX_STEP:
            self._refused.add("invalid_step", "range", f"step {s} is outside 0..2^63-1")
            return None
        self._next_step = s + 1
        self._fresh = s != self._last_step
        self._last_step = s
        return s

    def _instrument(self, name: str, table: dict[str, _Instrument]) -> _Instrument | None:
        inst = table.get(name)
        if inst is not None:
            return inst
        if not isinstance(name, str) or c.refused_name(name):
            self._refused.add("invalid_name", repr(name), f"metric name {name!r} is empty or only '/' and white space")
            return None
        named = c.INSTRUMENT_NAME.fullmatch(name) is None
        inst = table[name] = _Instrument(self._meter.create_gauge(c.NAMED_GAUGE if named else name), named)
        return inst

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Records each value of `values` (name → number: int, float, numpy or torch scalar) at
        `step` (an int >= 0; None: one past the last step logged, starting at 0).

        Never raises for bad input and never blocks on the network: a value that is not a number
        (`invalid_value`), a bad step (`invalid_step`) or an empty name (`invalid_name`) is
        counted, warned about once, and the other values are recorded. NaN and ±Inf are kept
        (serve writes them as such).
        """
        # The lock makes `finish` wait for a log in progress on
        # another thread, so no value lands in an SDK that is already shut down (uncontended,
        # it costs well under a µs).
        with self._record_lock:
            self._log(values, step)

    def _log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Records under the lock (see `log`)."""
        if self._closing:
            self._refused.add("after_finish", "log", "log() after finish()")
            return
        if type(values) is not dict and not isinstance(values, Mapping):
            self._refused.add("invalid_value", "log", f"log() takes a mapping of name to value, not {type(values).__name__}")
            return
        s = self._step(step)
        if s is None:
            return
        reader = self._reader
        # One attribute dict for the call's plain values: the SDK's cost grows with every key
        # of a new attribute set (it hashes and checks each), so points carry only the step
        # unless `record_time` asks for the record time too.
        base: dict[str, Any] = {c.STEP_ATTRIBUTE: s, c.TIME_ATTRIBUTE: time.time_ns()} if self._record_time else {c.STEP_ATTRIBUTE: s}
        gauges = self._gauges
        for name, value in values.items():
            inst = gauges.get(name) or self._instrument(name, gauges)
            if inst is None:
                continue
            if type(value) is float:
                v = value
            elif isinstance(value, (str, bytes)):
                self._refused.add("invalid_value", name, f"{name}: {value!r} is not a number")
                continue
            else:
                try:
                    v = float(value)
                except (TypeError, ValueError, OverflowError):
                    self._refused.add("invalid_value", name, f"{name}: {type(value).__name__} {str(value)[:40]} is not a float")
                    continue
            # The same value again at the same step (HF logs `epoch` with the train and the
            # eval logs of one step) is the same point: sending it twice would only make a
            # duplicate for serve to count. It is not counted again either.
            if inst.last_step == s and inst.last_value == v:
                continue
            self._recorded += 1
            inst.last_step, inst.last_value = s, v
            attrs = base
            if inst.named:
                attrs = {**base, c.NAME_ATTRIBUTE: name}
                # Every refused name shares one gauge: each adds a set to that one stream.
                if reader.note_sets(1):
                    reader.collect_now()
            if v - v != 0.0:  # NaN or ±Inf, without a function call for finite values
                attrs = {**attrs, c.NONFINITE_ATTRIBUTE: c.nonfinite_text(v)}
                v = 0.0
            inst.gauge.set(v, attrs)
        # A new step is a new set on each gauge; with the record time, so is every call.
        if (self._fresh or self._record_time) and reader.note_sets(1):
            reader.collect_now()
        self._fresh = False

    def histogram(self, name: str, values: Iterable[Any], step: int | None = None, *, buckets: int = 30) -> None:
        """Records the distribution of `values` (any iterable of numbers; numpy arrays and torch
        tensors are flattened) at `step` as one histogram data point: `buckets` equal-width
        buckets between the smallest and largest value (TensorBoard's default of 30), with the
        exact count, sum, min and max. TensorBoard shows it as a histogram; MLflow logs its mean.

        The buckets are computed here, not by an SDK Histogram instrument: the OTel API refuses
        negative values (gradients, weights) in a Histogram. NaN and ±Inf values are left out
        and counted `nonfinite_histogram_value`; values that are not numbers `invalid_value`.
        Raises `ConfigError` for `buckets` outside 1..1000 (a setting, not data).
        """
        with self._record_lock:
            self._histogram(name, values, step, buckets)

    def _histogram(self, name: str, values: Iterable[Any], step: int | None, buckets: int) -> None:
        """Records under the lock (see `histogram`)."""
        if self._closing:
            self._refused.add("after_finish", "histogram", "histogram() after finish()")
            return
        if not isinstance(name, str) or c.refused_name(name):
            self._refused.add("invalid_name", repr(name), f"metric name {name!r} is empty or only '/' and white space")
            return
        if not (isinstance(buckets, int) and 1 <= buckets <= 1000):
            raise ConfigError(f"buckets must be an int in 1..1000, got {buckets!r}")
        s = self._step(step)
        if s is None:
            return
        point = _histogram_point(name, values, s, buckets, self._refused)
        if point is None:
            return
        named = c.INSTRUMENT_NAME.fullmatch(name) is None
        with self._hist_lock:
            self._pending_histograms.append((c.NAMED_HISTOGRAM if named else name, point))
        self._recorded += 1

    def _take_histograms(self) -> list[Metric]:
        with self._hist_lock:
            pending, self._pending_histograms = self._pending_histograms, []
        by_name: dict[str, list[HistogramDataPoint]] = {}
        for name, point in pending:
            by_name.setdefault(name, []).append(point)
        return [
            Metric(name=n, description="", unit="", data=HistogramData(data_points=pts, aggregation_temporality=AggregationTemporality.DELTA))
            for n, pts in by_name.items()
        ]

    # -- ending -------------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED", *, timeout: float | None = None) -> RunSummary:
        """Ends the run: sends the run-end gauge with `status` (FINISHED, FAILED or KILLED),
        sends what is left within `timeout` seconds (default: `init`'s, 10 s; the last run of
        an embedded serve then waits up to 20 s more for serve to write what it holds), and
        prints where the run is and what was delivered.

        Idempotent: later calls return the first summary, its `dropped` brought up to date
        (values logged after the end count `after_finish`). Safe to interrupt: whatever an
        interrupted or failed shutdown did not send is counted `shutdown_timeout`. Raises
        `ConfigError` for another status or a timeout that is not a positive number. In a
        forked child of the process that started the run it does nothing."""
        wanted = status.upper() if isinstance(status, str) else None
        if wanted not in c.RUN_END_STATUSES:
            raise ConfigError(f"status {status!r}: expected one of {', '.join(c.RUN_END_STATUSES)}")
        limit = self._timeout if timeout is None else timeout
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {limit!r}")
        if os.getpid() != self._pid:
            # A forked child (a DataLoader worker, a multiprocessing pool) shares nothing of
            # the run but its memory: the parent ends it.
            return self._summary_now(wanted, None, time.monotonic())
        with self._lock:
            if self._summary is not None:
                self._summary.dropped = self._dropped_now()
                return self._summary
            with self._record_lock:
                self._closing = True
            started = time.monotonic()
            report = None
            try:
                if not self._end_sent:
                    self._end_sent = True
                    self._meter.create_gauge(c.RUN_END_METRIC).set(1, {"status": wanted})
                try:
                    self._provider.shutdown(timeout_millis=float(limit) * 1e3)
                except Exception as e:  # noqa: BLE001 - counted below, never raised at the trainer
                    log.warning("trainmetrics: shutting the SDK down failed: %r", e)
            finally:
                self._reader.abandon()
                try:
                    if self._serve is not None:
                        report = self._serve.release()
                finally:
                    self._summary = self._summary_now(wanted, report, started)
                    self._remove_handlers()
        if self._print:
            print(self._summary.text(), file=sys.stderr, flush=True)
        return self._summary

    def _dropped_now(self) -> dict[str, int]:
        dropped = dict(self._reader.delivery.dropped)
        for k, v in self._refused.counts.items():
            dropped[k] = dropped.get(k, 0) + v
        return dropped

    def _summary_now(self, status: str, report: str | None, started: float) -> RunSummary:
        forked = os.getpid() != self._pid
        return RunSummary(
            run_id=self.run_id,
            run_name=self.run_name,
            experiment=self.experiment,
            status=status,
            endpoint=self.endpoint,
            recorded=self._recorded,
            sent=0 if forked else self._reader.delivery.sent,
            dropped={} if forked else self._dropped_now(),
            tensorboard_dir=None if forked else self._find_tensorboard_dir(),
            mlflow_url=None if forked else self._find_mlflow_url(),
            serve_report=report,
            finish_seconds=time.monotonic() - started,
        )

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None) -> None:
        self.finish(_exit_status(exc_type, exc, self._killed))

    @property
    def delivery(self) -> Delivery:
        """Live counts of the reader (points sent, failed exports, drops by reason)."""
        return self._reader.delivery

    def _find_tensorboard_dir(self) -> Path | None:
        if self._serve is None:
            return None
        logdir = self._serve.logdir
        rank_dir = f"rank-{self.rank}" if self.rank is not None else None
        for marker in list(logdir.glob("*/.trainmetrics-run")) + list(logdir.glob("*/rank-*/.trainmetrics-run")):
            try:
                key = marker.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                continue
            if key == self.run_id or key.startswith(self.run_id + "#"):
                d = marker.parent
                if rank_dir is None or d.name == rank_dir:
                    return d
        return None

    def _find_mlflow_url(self) -> str | None:
        """The MLflow UI address of this run, looked up by its run key tag within 5 s in all (a
        server still starting answers slowly; a run just created may take a moment); None with
        a warning when it cannot be found."""
        uri = self._tracking_uri
        if not uri or not uri.startswith(("http://", "https://")):
            return None
        deadline = time.monotonic() + 5.0
        reason = "no run with this run key"
        while True:
            left = deadline - time.monotonic()
            try:
                found = self._mlflow_run(uri, max(left, 0.5))
            except (OSError, ValueError, KeyError) as e:
                found, reason = None, repr(e)
            if found is not None:
                parts = urllib.parse.urlsplit(uri)
                host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
                shown = urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")).rstrip("/")
                return f"{shown}/#/experiments/{found[0]}/runs/{found[1]}"
            if time.monotonic() + 1.0 > deadline:
                log.warning("trainmetrics: the MLflow run of %s was not found at its tracking URI (%s)", self.run_id, reason)
                return None
            time.sleep(1.0)

    def _mlflow_run(self, uri: str, timeout: float) -> tuple[str, str] | None:
        """(experiment id, MLflow run id) of the run whose `trainmetrics.run_key` is this run's id."""
        api = uri.rstrip("/") + "/api/2.0/mlflow"

        def post(path: str, body: dict[str, Any]) -> Any:
            req = urllib.request.Request(f"{api}/{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.load(r)

        if self.experiment is not None:
            q = urllib.parse.urlencode({"experiment_name": self.experiment})
            with urllib.request.urlopen(f"{api}/experiments/get-by-name?{q}", timeout=timeout) as r:
                experiments = [json.load(r)["experiment"]["experiment_id"]]
        else:
            experiments = [e["experiment_id"] for e in post("experiments/search", {"max_results": 1000}).get("experiments", [])]
        body = {"experiment_ids": experiments, "filter": f"tags.`trainmetrics.run_key` = '{self.run_id}'", "max_results": 1}
        runs = post("runs/search", body).get("runs", [])
        if not runs:
            return None
        return str(runs[0]["info"]["experiment_id"]), str(runs[0]["info"]["run_id"])

    # -- process end --------------------------------------------------------------------------

    def _install_handlers(self) -> None:
        atexit.register(self._at_exit)
        _Excepthook.install()
        if threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _remove_handlers(self) -> None:
        atexit.unregister(self._at_exit)
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None

    def _at_exit(self) -> None:
        if os.getpid() != self._pid:
            return
        self.finish(_exit_status(_Excepthook.seen, None, self._killed))

    def _on_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
        prev = self._prev_sigterm
        if prev is signal.SIG_IGN:
            return
        if os.getpid() == self._pid:
            self._killed = True
        if callable(prev):
            prev(signum, frame)
            return
        # The default action ends the process, but by unwinding (SystemExit, exit status
        # 128 + 15 as a shell reports a SIGTERM), never by finishing inside this handler: the
        # interrupted code may hold the SDK's locks, which finishing needs. `with` blocks,
        # `finally` clauses and the exit hook then end the run KILLED.
        raise SystemExit(128 + signum)


def _exit_status(exc_type: type[BaseException] | None, exc: BaseException | None, killed: bool) -> str:
    """The run-end status for a way of ending: SIGTERM or Ctrl-C → KILLED, an exception or a
    non-zero `sys.exit` → FAILED, else FINISHED."""
    if killed or (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)):
        return "KILLED"
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, SystemExit):
        code = exc.code if isinstance(exc, SystemExit) else None
        return "FINISHED" if code in (None, 0) else "FAILED"
    return "FAILED"


class _Excepthook:
    """Remembers an uncaught exception, so a run the trainer never finished ends FAILED at exit."""

    seen: type[BaseException] | None = None
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        cls._installed = True
        previous = sys.excepthook

        def hook(t: type[BaseException], e: BaseException, tb: types.TracebackType | None) -> None:
            cls.seen = t
            previous(t, e, tb)

        sys.excepthook = hook


def init(experiment: str | None = None, run_name: str | None = None, **options: Unpack[RunOptions]) -> Run:
    """Starts a run and returns it (usable as a context manager: an exception ends it FAILED).

    - `experiment`: MLflow experiment (default `MLFLOW_EXPERIMENT_NAME`, else serve's default);
      `run_name` (default `run-<UTC yyyymmdd-hhmmss>`); `run_id` (default
      `TRAINMETRICS_RUN_ID`, else the run key of `MLFLOW_RUN_ID`'s run, else a new uuid4 hex;
      the same id continues the same run); `params` (nested mappings flatten to dotted keys;
      → MLflow params, TensorBoard hparams); `tags` (→ MLflow run tags).
    - Where to: `endpoint` (an OTLP URL; default `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` /
      `OTEL_EXPORTER_OTLP_ENDPOINT`, with the OTel variables for headers, TLS and protocol);
      `protocol` ("http/protobuf", the OTel default, or "grpc"; default the OTel variables).
      With none of them, the embedded default: a local `trainmetrics serve` shared by this
      machine's trainers, TensorBoard into `logdir` (`./runs`), MLflow at `tracking_uri`
      (default `MLFLOW_TRACKING_URI`, none if unset).
    - `rank`: "auto" reads `RANK`/`WORLD_SIZE` (a job of several processes sends its rank, and
      every rank must share the run id, see `_shared_identity`); None: not part of a job.
    - Cadence of the SDK side: collect every `export_interval` seconds and every
      `collect_every` new steps; keep at most `max_queued_points` waiting for the endpoint;
      `finish` waits at most `timeout` seconds.
    - `exporter`: an SDK `MetricExporter` to use instead of OTLP (tests, debugging).
    - `record_time`: also send each value's record time (attribute `trainmetrics.time_unix_nano`,
      ns) for MLflow timestamps exact to the record call. Off by default: the extra attribute
      costs ~50% more per value in the SDK, and without it a point's time is its collection's,
      at most `export_interval` later (serve tells resumes and retries apart by these times
      either way).

    Raises `ConfigError` for settings that cannot work and `EmbeddedServeError` when the
    embedded serve cannot start.
    """
    return Run(experiment, run_name, **options)
