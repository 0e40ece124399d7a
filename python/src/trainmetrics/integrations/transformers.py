"""HF Trainer: `Trainer(..., callbacks=[TrainmetricsCallback()])`.

What it records, at `state.global_step`, from every `on_log` (so `logging_steps` decides how
often HF hands values over; with `logging_steps=1` every step reaches trainmetrics and each
backend's cadence in `serve` decides what it gets, e.g. TensorBoard every step, MLflow the mean
of every 100):

| HF key                       | trainmetrics name        |
|------------------------------|--------------------------|
| `loss`                       | `train.loss`             |
| `learning_rate`              | `train.lr`               |
| `grad_norm`                  | `train.grad_norm`        |
| `epoch`                      | `train.epoch`            |
| `eval_<x>`                   | `eval.<x>`               |
| `test_<x>`, `predict_<x>`    | `test.<x>`, `predict.<x>`|
| `train_runtime`, `train_samples_per_second`, `train_steps_per_second`, `train_loss`, `total_flos` (the end-of-training summary) | `summary.<key>` |
| anything else                | unchanged                |

Params: every `TrainingArguments` field and the model's config (`model.<key>`), plus `params`.
Ranks: world process zero only by default (HF already averages the loss over ranks);
`all_ranks=True` sends every rank with its rank attribute (`serve` then writes one TensorBoard
run per rank and one MLflow run per job). `on_train_end` ends the run FINISHED; an exception that
ends the process ends it FAILED (`init`'s exit hook), SIGTERM KILLED.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .._run import Run, init

#: HF's end-of-training summary keys (logged once by `Trainer.train`).
SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"})
RENAMES = {"loss": "train.loss", "learning_rate": "train.lr", "grad_norm": "train.grad_norm", "epoch": "train.epoch"}
PREFIXES = (("eval_", "eval."), ("test_", "test."), ("predict_", "predict."))


def metric_name(key: str) -> str:
    """The trainmetrics name of an HF log key (module table)."""
    if key in SUMMARY_KEYS:
        return "summary." + key
    renamed = RENAMES.get(key)
    if renamed is not None:
        return renamed
    for hf, ours in PREFIXES:
        if key.startswith(hf) and len(key) > len(hf):
            return ours + key[len(hf) :]
    return key


def _scalars(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None or isinstance(v, Mapping)}


class TrainmetricsCallback(TrainerCallback):
    """Sends an HF `Trainer`'s logs to trainmetrics. Keywords are `trainmetrics.init`'s
    (`experiment`, `run_name` (default `TrainingArguments.run_name`), `endpoint`, `params`, …)."""

    def __init__(self, experiment: str | None = None, run_name: str | None = None, *, all_ranks: bool = False, **init_kwargs: Any) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self.all_ranks = all_ranks
        self.init_kwargs = init_kwargs
        self.run: Run | None = None

    def _sends(self, state: TrainerState) -> bool:
        return self.all_ranks or state.is_world_process_zero

    def _ensure_run(self, args: TrainingArguments, state: TrainerState, model: Any) -> Run | None:
        if self.run is not None and self.run._summary is None:
            return self.run
        if not self._sends(state):
            return None
        if self.run is not None:
            # Logs after the end of training (`trainer.evaluate()` after `train()`) continue the
            # same run; it ends at exit.
            previous = self.run
            self.run = init(previous.experiment, previous.run_name, run_id=previous.run_id, rank=previous.rank, **self.init_kwargs)
            return self.run
        params: dict[str, Any] = _scalars(args.to_dict())  # type: ignore[no-untyped-call]
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            params.update({f"model.{k}": v for k, v in _scalars(config.to_dict()).items()})
        params.update(self.init_kwargs.pop("params", None) or {})
        run_name = self.run_name or (args.run_name if args.run_name and args.run_name != args.output_dir else None)
        rank: Any = "auto" if self.all_ranks else None
        self.run = init(self.experiment, run_name, params=params, rank=rank, **self.init_kwargs)
        return self.run

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any) -> None:
        self._ensure_run(args, state, model)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, model: Any = None, **kwargs: Any
    ) -> None:
        if not logs:
            return
        run = self._ensure_run(args, state, model)
        if run is not None:
            run.log({metric_name(k): v for k, v in logs.items() if not isinstance(v, (str, bytes))}, step=state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.finish("FINISHED")

    def finish(self, status: str = "FINISHED") -> None:
        """Ends the run (e.g. `FAILED` from a notebook, where no exit hook sees the error)."""
        if self.run is not None:
            self.run.finish(status)


