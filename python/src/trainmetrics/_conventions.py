"""The conventions `trainmetrics serve` reads from OTLP (source: the Rust crate's `src/decode/mod.rs`
and the README's "Rules"), in one place for the whole package."""

from __future__ import annotations

import math
import re
from typing import Final

#: Data point attribute carrying the training step (an int; `identity`/`step_attribute` in serve).
STEP_ATTRIBUTE: Final = "step"
#: Data point attribute carrying the record time as int ns since the Unix epoch: the SDK stamps
#: points with the collection time, up to an export interval later.
TIME_ATTRIBUTE: Final = "trainmetrics.time_unix_nano"
#: A NaN or +-Inf value (which the SDK would drop) travels as 0.0 with this attribute holding
#: "NaN", "Infinity" or "-Infinity".
NONFINITE_ATTRIBUTE: Final = "trainmetrics.nonfinite"
#: A name the OTel API refuses as an instrument name (`acc@1`) travels on a shared instrument
#: with this attribute holding the real name.
NAME_ATTRIBUTE: Final = "trainmetrics.name"
NAMED_GAUGE: Final = "trainmetrics.named"
NAMED_HISTOGRAM: Final = "trainmetrics.named_histogram"
#: The SDK folds attribute sets past its cardinality limit into one point with this attribute.
OVERFLOW_ATTRIBUTE: Final = "otel.metric.overflow"
#: The run-end gauge, recorded once with the attribute `status` (README "Run end").
RUN_END_METRIC: Final = "trainmetrics.run.end"
RUN_END_STATUSES: Final = ("FINISHED", "FAILED", "KILLED")

#: Resource attributes of the run identity (serve's `identity` defaults).
EXPERIMENT_KEY: Final = "ml.experiment.name"
RUN_NAME_KEY: Final = "ml.run.name"
RUN_ID_KEY: Final = "ml.run.id"
PARAM_PREFIX: Final = "ml.param."
RANK_KEY: Final = "rank"

#: The OTel API's instrument name rule (the Python API checks the same expression).
INSTRUMENT_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.\-/]{0,254}")

#: Steps travel as an OTel int attribute (int64).
MAX_STEP: Final = 2**63 - 1


def nonfinite_text(value: float) -> str | None:
    """The text serve reads for a non-finite value, or None for a finite one."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return None


def refused_name(name: str) -> bool:
    """True for a name serve refuses (`invalid_name`): empty, or only `/` and white space."""
    return name.replace("/", "").strip() == ""
