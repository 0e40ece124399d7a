"""A real Lightning run for the tests: an MLP on sklearn's digits with `TrainmetricsLogger`,
`log_every_n_steps=1`, validation every 50 steps, on CPU.

    python lightning_digits.py --out result.json [--steps 200] [--fail-at N] [--run-name R]

Writes {"logged": [[step, {name: value}], ...], "run_id": ...} to --out: exactly what Lightning
handed the logger (recorded by a subclass), to compare with what the backends show.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from trainmetrics.integrations.lightning import TrainmetricsLogger


class Recording(TrainmetricsLogger):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self.logged.append((step, {k: float(v) for k, v in metrics.items()}))
        super().log_metrics(metrics, step)


class Mlp(L.LightningModule):
    def __init__(self, lr: float = 3e-3, hidden: int = 64, fail_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        if self.hparams.fail_at and self.global_step == self.hparams.fail_at:
            raise RuntimeError(f"injected failure at step {self.global_step}")
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, i: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--fail-at", type=int)
    p.add_argument("--run-name", default=None)
    p.add_argument("--experiment", default="lightning-digits")
    a = p.parse_args()
    L.seed_everything(0)
    ds = load_digits()
    x = torch.tensor(ds.data / 16.0, dtype=torch.float32)
    y = torch.tensor(ds.target, dtype=torch.long)
    order = torch.tensor(np.random.default_rng(0).permutation(len(x)))
    tr, ev = order[:1500], order[1500:]
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[ev], y[ev]), batch_size=128)
    logger = Recording(a.experiment, a.run_name)
    trainer = L.Trainer(
        max_steps=a.steps, logger=logger, log_every_n_steps=1, val_check_interval=50, check_val_every_n_epoch=None,
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    try:
        trainer.fit(Mlp(fail_at=a.fail_at), train, val)
    finally:
        with open(a.out, "w") as f:
            json.dump({"logged": logger.logged, "run_id": logger.experiment.run_id if logger.experiment else None}, f)


if __name__ == "__main__":
    main()
