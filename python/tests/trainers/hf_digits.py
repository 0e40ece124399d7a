"""A real HF Trainer run for the tests: a 2-layer GPT-2 built from a config (randomly
initialized) classifying scikit-learn's bundled digits, each 8x8 image read as 64 tokens of
intensity 0..16. `logging_steps=1`, evaluation every 50 steps, on CPU (gloo under torchrun).

    python hf_digits.py --out result.json [--steps 200] [--fail-at N] [--all-ranks]
        [--experiment E] [--run-name R]

Writes {"log_history": [...], "run_id": ..., "rank": ...} to --out (per rank: --out gets
`.rank<N>` under torchrun). The endpoint comes from the OTel environment, or the embedded
default when none is set.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import torch
from sklearn.datasets import load_digits
from transformers import GPT2Config, GPT2ForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from trainmetrics.integrations.transformers import TrainmetricsCallback

PAD = 17


class Digits(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = torch.tensor(x, dtype=torch.long)
        self.y = torch.tensor(y, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


class FailAt(TrainerCallback):  # type: ignore[misc]
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--fail-at", type=int)
    p.add_argument("--all-ranks", action="store_true")
    p.add_argument("--experiment", default="hf-digits")
    p.add_argument("--run-name", default=None)
    a = p.parse_args()

    torch.manual_seed(0)
    ds = load_digits()
    x, y = ds.data.astype(np.int64), ds.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    tr, ev = order[:1500], order[1500:]
    config = GPT2Config(vocab_size=PAD + 1, n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=10, pad_token_id=PAD)
    model = GPT2ForSequenceClassification(config)

    def accuracy(pred):  # type: ignore[no-untyped-def]
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    out_dir = tempfile.mkdtemp(prefix="hf-digits-")
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=a.steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=50,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        run_name=a.run_name,
    )
    callback = TrainmetricsCallback(experiment=a.experiment, all_ranks=a.all_ranks)
    callbacks: list[TrainerCallback] = [callback]
    if a.fail_at:
        callbacks.append(FailAt(a.fail_at))
    trainer = Trainer(model=model, args=args, train_dataset=Digits(x[tr], y[tr]), eval_dataset=Digits(x[ev], y[ev]), compute_metrics=accuracy, callbacks=callbacks)

    def dump() -> None:
        rank = int(os.environ.get("RANK", "0"))
        path = a.out if int(os.environ.get("WORLD_SIZE", "1")) == 1 else f"{a.out}.rank{rank}"
        with open(path, "w") as f:
            json.dump({"log_history": trainer.state.log_history, "run_id": callback.run.run_id if callback.run else None, "rank": rank}, f)

    try:
        trainer.train()
    finally:
        dump()


if __name__ == "__main__":
    main()
