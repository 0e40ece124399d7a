"""Axolotl: one line in the YAML config,

    plugins:
      - trainmetrics.integrations.axolotl.TrainmetricsPlugin

Axolotl's plugin manager imports the class and merges `TrainmetricsArgs` into its config schema,
so these keys sit beside Axolotl's own (all optional):

    trainmetrics_endpoint: http://127.0.0.1:4318   # default: OTel env, else the embedded serve
    trainmetrics_experiment: my-sft                # default: MLFLOW_EXPERIMENT_NAME
    trainmetrics_run_name: sft-1                   # default: Axolotl's run name if any
    trainmetrics_all_ranks: false                  # every rank with its rank attribute

The plugin adds `TrainmetricsCallback` (see `integrations.transformers`) before the trainer is
built, with the Axolotl config's scalar keys as extra params (`axolotl.<key>`).
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin  # type: ignore[import-untyped]
from pydantic import BaseModel

from .transformers import TrainmetricsCallback


class TrainmetricsArgs(BaseModel):
    """The plugin's keys in the Axolotl YAML (module doc)."""

    trainmetrics_endpoint: str | None = None
    trainmetrics_experiment: str | None = None
    trainmetrics_run_name: str | None = None
    trainmetrics_all_ranks: bool = False


class TrainmetricsPlugin(BasePlugin):  # type: ignore[misc]
    """Sends an Axolotl run's HF Trainer logs to trainmetrics."""

    def get_input_args(self) -> str:
        return "trainmetrics.integrations.axolotl.TrainmetricsArgs"

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[Any]:
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        params = {
            f"axolotl.{k}": v
            for k, v in dict(cfg).items()
            if not k.startswith("trainmetrics_") and (isinstance(v, (str, int, float, bool)))
        }
        kwargs: dict[str, Any] = {"params": params}
        if get("trainmetrics_endpoint"):
            kwargs["endpoint"] = get("trainmetrics_endpoint")
        run_name = get("trainmetrics_run_name") or get("wandb_name") or get("mlflow_run_name")
        return [
            TrainmetricsCallback(
                experiment=get("trainmetrics_experiment"),
                run_name=run_name,
                all_ranks=bool(get("trainmetrics_all_ranks", False)),
                **kwargs,
            )
        ]
