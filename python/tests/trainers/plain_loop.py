"""A plain training loop with the core API, for the tests: deterministic values per step.

    python plain_loop.py --out result.json [--steps N] [--sleep-ms MS] [--run-name R]
        [--experiment E] [--start S] [--ready FILE]

train.loss = 1/step + 0.01*(step % 7), train.lr = 1e-3*(1 - step/steps); writes
{"run_id", "recorded": {name: {step: value}}, "summary": {...}} to --out at the end.
`--ready FILE` is created after the first step (for tests that signal a running trainer).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import trainmetrics


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--sleep-ms", type=int, default=0)
    p.add_argument("--run-name")
    p.add_argument("--experiment", default="plain")
    p.add_argument("--ready")
    a = p.parse_args()
    recorded: dict[str, dict[int, float]] = {"train.loss": {}, "train.lr": {}}
    out = Path(a.out)

    def dump(summary: trainmetrics.RunSummary | None) -> None:
        s = None if summary is None else {"status": summary.status, "sent": summary.sent, "dropped": summary.dropped, "recorded": summary.recorded}
        # Atomic: SIGTERM unwinds the process, and may do so in the middle of this write.
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": run.run_id, "recorded": recorded, "summary": s}))
        os.replace(tmp, out)

    run = trainmetrics.init(a.experiment, a.run_name, params={"steps": a.steps, "lr": 1e-3})
    for step in range(a.start, a.start + a.steps):
        values = {"train.loss": 1.0 / step + 0.01 * (step % 7), "train.lr": 1e-3 * (1 - step / (a.start + a.steps))}
        run.log(values, step=step)
        for k, v in values.items():
            recorded[k][step] = v
        dump(None)
        if a.ready and step == a.start:
            Path(a.ready).write_text("")
        if a.sleep_ms:
            time.sleep(a.sleep_ms / 1e3)
    dump(run.finish())


if __name__ == "__main__":
    main()
