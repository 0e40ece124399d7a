#!/usr/bin/env python3
"""Peer benchmark for scripts/bench.sh: TensorBoard's own writer (EventFileWriter, the writer
torch.utils.tensorboard also uses) writing the same scalars as benches/throughput.rs's
TensorBoardExporter row: 100 tags x 1000 steps, one event per step. Prints one table row with
the median points/s of 5 rounds, flush included."""

import statistics
import sys
import tempfile
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.scalar import summary_v2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

rates = []
for _ in range(5):
    with tempfile.TemporaryDirectory() as d:
        w = EventFileWriter(d, max_queue_size=10, flush_secs=120)
        t = time.perf_counter()
        for step in range(1, 1001):
            values = [summary_v2.scalar_pb("tag%03d" % i, step * 0.001).value[0] for i in range(100)]
            w.add_event(event_pb2.Event(step=step, wall_time=time.time(), summary=summary_pb2.Summary(value=values)))
        w.flush()
        rates.append(100_000 / (time.perf_counter() - t))
        w.close()
print("| peer: tensorboard EventFileWriter (Python) | %.1f | points/s | same 100 tags x 1000 steps |" % statistics.median(rates))
sys.stdout.flush()
