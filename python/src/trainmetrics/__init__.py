"""trainmetrics for Python trainers: record once through OpenTelemetry, delivered to TensorBoard
and MLflow by `trainmetrics serve`, each backend on its own cadence.

    import trainmetrics
    run = trainmetrics.init(experiment="digits", run_name="mlp-1", params={"lr": 3e-3})
    run.log({"train.loss": loss, "train.lr": lr}, step=step)
    run.finish()

Integrations: `trainmetrics.integrations.transformers.TrainmetricsCallback` (HF Trainer),
`trainmetrics.integrations.lightning.TrainmetricsLogger`, and
`trainmetrics.integrations.axolotl.TrainmetricsPlugin`.
"""

from ._embedded import find_binary
from ._reader import Delivery
from ._run import Run, RunSummary, init
from .errors import ConfigError, EmbeddedServeError, TrainmetricsError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Delivery",
    "EmbeddedServeError",
    "Run",
    "RunSummary",
    "TrainmetricsError",
    "find_binary",
    "init",
]
