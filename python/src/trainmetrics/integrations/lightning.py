"""Lightning: `Trainer(logger=TrainmetricsLogger())`.

A Lightning `Logger`: `log_metrics(metrics, step)` records each metric under the name Lightning
gives it (`self.log("train_loss", …)` → `train_loss`; its `epoch` too) at `step`
(Lightning's `global_step`); `log_hyperparams` become MLflow params and TensorBoard hparams;
`finalize("success")` ends the run FINISHED, `finalize("failed")` FAILED, any other status
KILLED. The run starts at the first metrics, so the hyperparameters Lightning logs when fitting
begins are in it; params logged after that are warned about and left out (OTel resources are
fixed). Metrics after `finalize` (a `trainer.test()` after `fit`) continue the same run.

Ranks: global rank zero only by default (what Lightning's own loggers do); `all_ranks=True`
sends every rank with its rank attribute (one TensorBoard run per rank, one MLflow run per job).
`name` is the experiment, `version` the run name.
"""

from __future__ import annotations

import argparse
import datetime
import logging
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from .._run import Run, _flatten, init

log = logging.getLogger("trainmetrics")

STATUSES = {"success": "FINISHED", "failed": "FAILED"}


class TrainmetricsLogger(Logger):
    """Keywords are `trainmetrics.init`'s (`endpoint`, `params`, `logdir`, …)."""

    def __init__(self, experiment: str | None = None, run_name: str | None = None, *, all_ranks: bool = False, **init_kwargs: Any) -> None:
        super().__init__()
        self._experiment_name = experiment
        self._run_name = run_name or "run-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        self._all_ranks = all_ranks
        self._params: dict[str, Any] = dict(init_kwargs.pop("params", None) or {})
        self._init_kwargs = init_kwargs
        self._run: Run | None = None
        self._run_id: str | None = init_kwargs.pop("run_id", None)

    def _sends(self) -> bool:
        return self._all_ranks or getattr(rank_zero_only, "rank", 0) == 0

    @property
    def name(self) -> str:
        return self._experiment_name or "trainmetrics"

    @property
    def version(self) -> str:
        return self._run_name

    @property
    def experiment(self) -> Run | None:
        """The `trainmetrics.Run` (None off rank zero unless `all_ranks`, or before metrics)."""
        return self._run

    def _ensure_run(self) -> Run:
        if self._run is None or self._run._summary is not None:
            self._run = init(
                self._experiment_name,
                self._run_name,
                run_id=self._run_id,
                params=self._params,
                rank="auto" if self._all_ranks else None,
                **self._init_kwargs,
            )
            self._run_id = self._run.run_id
        return self._run

    def log_hyperparams(self, params: Mapping[str, Any] | argparse.Namespace, *args: Any, **kwargs: Any) -> None:
        if not self._sends():
            return
        if isinstance(params, argparse.Namespace):
            params = vars(params)
        if self._run is not None and self._run._summary is None:
            new = {k for k in _flatten(dict(params)) if k not in self._run.params}
            if new:
                log.warning("trainmetrics: params %s logged after the run started are left out", sorted(new)[:10])
            return
        self._params.update(dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._sends():
            return
        self._ensure_run().log(metrics, step=step)

    def finalize(self, status: str) -> None:
        if not self._sends() or self._run is None:
            return
        self._run.finish(STATUSES.get(status, "KILLED"))
