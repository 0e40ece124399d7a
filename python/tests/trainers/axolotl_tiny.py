"""A real Axolotl run for the tests, on CPU, with nothing from the network: a 2-layer GPT-2
built from a config (randomly initialized, `save_pretrained`), a word-level tokenizer built with
`tokenizers` from the dataset's own words, a JSONL dataset of generated sentences, and an
Axolotl YAML that loads `TrainmetricsPlugin` through its `plugins:` list. Training goes through
Axolotl's own CLI (`axolotl train <yaml> --launcher python`) in a child process, so Axolotl's
config validation, plugin manager, dataset preparation and trainer builder all run as they do
for a user.

    python axolotl_tiny.py --dir WORK --out result.json [--steps 200]
        [--experiment E] [--run-name R]

Writes {"log_history": [...], "run_id": ..., "plugins": [...], "returncode": N} to --out, from
`CapturePlugin` (below, a second plugin in the same YAML list, since the HF callbacks and the
trainer live in Axolotl's process, not this one). Exits with Axolotl's exit code. The endpoint
comes from the OTel environment, or the embedded default when none is set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Words of the generated sentences; the tokenizer's vocabulary is exactly these plus specials,
# so every token is known and the model is tiny.
SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a child", "the farmer", "our neighbor"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "feeds", "watches", "calls"]
ADJECTIVES = ["red", "big", "small", "quiet", "old", "green", "happy", "tall"]
OBJECTS = ["ball", "house", "tree", "river", "car", "book", "garden", "horse"]
PLACES = ["in the park", "at home", "near the lake", "after school", "every morning", "on sunday"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` deterministic short sentences (8-12 words)."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)} {rng.choice(PLACES)} ." for _ in range(n)]


def build_tokenizer(texts: list[str], out: Path) -> Any:
    """A WordLevel tokenizer over the texts' words, saved as a `PreTrainedTokenizerFast` (what
    Axolotl's `AutoTokenizer` load finds through `tokenizer_config.json`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))  # type: ignore[no-untyped-call]
    # A BOS in front of every sequence, like the usual causal-LM tokenizers; Axolotl's
    # completion strategy appends the EOS itself.
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=64)  # type: ignore[no-untyped-call]
    fast.save_pretrained(out)
    return fast


def build_model(tokenizer: Any, out: Path) -> None:
    """A 2-layer GPT-2 from a config (randomly initialized), like `hf_digits.py`'s."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(out)  # type: ignore[no-untyped-call]


def axolotl_config(work: Path, steps: int, experiment: str | None, run_name: str | None) -> dict[str, Any]:
    """The Axolotl YAML: our plugin from `plugins:`, everything local, fp32 on CPU."""
    model = str(work / "model")
    cfg: dict[str, Any] = {
        "base_model": model,
        "tokenizer_config": model,
        "datasets": [{"path": str(work / "data" / "train.jsonl"), "ds_type": "json", "type": "completion", "field": "text"}],
        # Tokenized datasets are cached here, not in ./last_run_prepared of the cwd.
        "dataset_prepared_path": str(work / "prepared"),
        # Tokenizing 2700 short lines needs no worker pool (2 cores, shared with serve).
        "dataset_num_proc": 1,
        "val_set_size": 0.1,
        "output_dir": str(work / "out"),
        "sequence_len": 32,
        "sample_packing": False,
        "pad_to_sequence_len": False,
        "micro_batch_size": 8,
        "eval_batch_size": 32,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": steps,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "learning_rate": 0.001,
        "warmup_steps": 0,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 50,
        # No checkpoints (Axolotl still saves the final model to output_dir; tiny).
        "save_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
        # fp32 on CPU. The one setting CPU needs: Axolotl's default `bf16: auto` finds no bf16
        # GPU and turns fp16 on, loading the model in float16, and the first forward fails
        # ("mixed dtype (CPU): expect parameter to have scalar type of Float").
        "bf16": False,
        "fp16": False,
        "tf32": False,
        # No CUDA-only attention kernels (their defaults are off too; said here for the reader);
        # the model keeps transformers' default attention, which runs on CPU.
        "flash_attention": False,
        "sdp_attention": False,
        "xformers_attention": False,
        "gradient_checkpointing": False,
        "plugins": ["trainmetrics.integrations.axolotl.TrainmetricsPlugin", "axolotl_tiny.CapturePlugin"],
        "trainmetrics_experiment": experiment,
        "trainmetrics_run_name": run_name,
    }
    return cfg


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--experiment", default="axolotl-tiny")
    p.add_argument("--run-name", default=None)
    a = p.parse_args()

    import yaml

    work: Path = a.dir.resolve()
    (work / "data").mkdir(parents=True, exist_ok=True)
    texts = sentences(3000)
    with open(work / "data" / "train.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    tokenizer = build_tokenizer(texts, work / "model")
    build_model(tokenizer, work / "model")
    config = work / "axolotl.yaml"
    config.write_text(yaml.safe_dump(axolotl_config(work, a.steps, a.experiment, a.run_name)))

    env = dict(os.environ)
    # CapturePlugin is imported by Axolotl's plugin manager by module name.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["AXOLOTL_TINY_OUT"] = str(a.out.resolve())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Axolotl's telemetry is on unless opted out, and would post to the network.
    env.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    # CPU only, even on a machine with a GPU (Axolotl picks cuda when it sees one).
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    # Within the 2 cores, without oversubscribing the collector and serve.
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("WANDB_DISABLED", "true")
    axolotl = Path(sys.executable).with_name("axolotl")
    # `--launcher python` runs `axolotl.cli.train.do_cli` in the CLI's process (the default,
    # accelerate, would re-launch through `accelerate launch` for nothing on one CPU).
    proc = subprocess.run([str(axolotl), "train", str(config), "--launcher", "python"], env=env, cwd=work)
    if not a.out.exists():
        a.out.write_text(json.dumps({"log_history": [], "run_id": None, "plugins": [], "returncode": proc.returncode}))
    else:
        res = json.loads(a.out.read_text())
        res["returncode"] = proc.returncode
        a.out.write_text(json.dumps(res))
    sys.exit(proc.returncode)


# -- in Axolotl's process --------------------------------------------------------------------------

if TYPE_CHECKING or __name__ != "__main__":
    from axolotl.integrations.base import BasePlugin
    from transformers import TrainerCallback
else:
    # The builder half needs neither, and importing Axolotl here would cost ~10 s of the
    # test's time for nothing.
    BasePlugin = TrainerCallback = object


class Capture(TrainerCallback):
    """Writes `state.log_history`, our callback's run id and the plugin manager's plugins to
    `AXOLOTL_TINY_OUT` at the end of training (and on every log, so a crash leaves what got
    this far)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def dump(self, state: Any) -> None:
        from axolotl.integrations.base import PluginManager

        from trainmetrics.integrations.transformers import TrainmetricsCallback

        ours = [c for c in self.trainer.callback_handler.callbacks if isinstance(c, TrainmetricsCallback)]
        run = ours[0].run if ours else None
        out = {
            "log_history": state.log_history,
            "run_id": run.run_id if run is not None else None,
            "plugins": list(PluginManager.get_instance().plugins),
            "trainmetrics_callbacks": len(ours),
        }
        Path(os.environ["AXOLOTL_TINY_OUT"]).write_text(json.dumps(out))

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dump(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dump(state)


class CapturePlugin(BasePlugin):  # type: ignore[misc]
    """Adds `Capture` after the trainer is built, when the trainer (and so our callback among
    its callbacks) exists."""

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[Any]:
        return [Capture(trainer)]


if __name__ == "__main__":
    main()
