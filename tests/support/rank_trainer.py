"""One process of a trainer, with the OTel Python SDK as it comes (default temporality).

Case 016: `--rank N` puts the resource attribute `rank` on the process, as a launcher's
environment (RANK) would, and offsets every value by N * 1000; every process also gets its own
`service.instance.id`, as SDK resource detectors give.

Case 018: at its end the process records the run-end gauge `trainmetrics.run.end` once, with
the attribute `status`: FINISHED after a clean loop, FAILED when the loop raised (the process
then exits 1 with the exception, as a crashing trainer does).

Per step it records the Gauge `train.loss` = step + offset and the Histogram `train.grad_norm`
(two records) with the attribute `step`, exported over OTLP/gRPC every 500 ms. Uses its own
MeterProvider (never the global one).
"""

from __future__ import annotations

import argparse
import time
import uuid

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource


class InjectedFailure(RuntimeError):
    """The failure `--fail-after` raises."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-seconds", type=float, default=0.01)
    ap.add_argument("--fail-after", type=int, default=None, help="raise after this step")
    ap.add_argument("--no-end", action="store_true", help="never record the run end")
    args = ap.parse_args()

    attributes: dict[str, str | int] = {
        "ml.run.id": args.run_id,
        "ml.run.name": args.run_id,
        "ml.experiment.name": args.experiment,
        "service.name": "rank-trainer",
        "service.instance.id": str(uuid.uuid4()),
    }
    offset = 0.0
    if args.rank is not None:
        attributes["rank"] = args.rank
        offset = args.rank * 1000.0
    exporter = OTLPMetricExporter(endpoint=args.endpoint, insecure=True)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=500)
    provider = MeterProvider(resource=Resource.create(attributes), metric_readers=[reader])
    meter = provider.get_meter("rank-trainer")
    loss = meter.create_gauge("train.loss")
    grad = meter.create_histogram("train.grad_norm")
    end = meter.create_gauge("trainmetrics.run.end")
    status = "FINISHED"
    try:
        for step in range(1, args.steps + 1):
            loss.set(step + offset, {"step": step})
            grad.record(1.0, {"step": step})
            grad.record(3.0, {"step": step})
            if args.fail_after is not None and step == args.fail_after:
                raise InjectedFailure(f"injected failure after step {step}")
            time.sleep(args.step_seconds)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if not args.no_end:
            end.set(1, {"status": status})
        provider.shutdown()


if __name__ == "__main__":
    main()
