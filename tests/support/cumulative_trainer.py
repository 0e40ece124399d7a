"""A trainer that uses the OTel Python SDK as it comes: default (cumulative) temporality.

Case 015: per step, three records of the Histogram `train.grad_norm` and one add of the
Counter `train.tokens`, each with the step as the attribute `step`, exported every second
over OTLP/gRPC. With cumulative temporality the SDK re-sends every step's attribute set at
each collection. Uses its own MeterProvider (never the global one).
"""

from __future__ import annotations

import argparse
import time

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--step-seconds", type=float, default=0.02)
    args = ap.parse_args()

    exporter = OTLPMetricExporter(endpoint=args.endpoint, insecure=True)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=1000)
    resource = Resource.create({"ml.run.id": args.run_id, "ml.run.name": args.run_id})
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    meter = provider.get_meter("case-015")
    grad = meter.create_histogram("train.grad_norm")
    tokens = meter.create_counter("train.tokens")
    for step in range(1, args.steps + 1):
        attrs = {"step": step}
        for k in range(3):
            grad.record(step / 100 + k, attrs)
        tokens.add(step + 1, attrs)
        time.sleep(args.step_seconds)
    provider.force_flush()
    provider.shutdown()


if __name__ == "__main__":
    main()
