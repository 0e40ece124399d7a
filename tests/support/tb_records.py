"""For the TensorBoard exporter's unit tests: reads every event file of a run dir (sorted by
name) with TensorBoard's own EventFileLoader and prints one JSON object: {"files": n,
"records": [[file_index, step, tag, has_plugin_metadata, value], ...]} (session starts as tag
"__session__")."""
import json, math, os, sys
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util
d = sys.argv[1]
files = sorted(f for f in os.listdir(d) if "tfevents" in f)
out = []
for i, f in enumerate(files):
    for ev in event_file_loader.EventFileLoader(os.path.join(d, f)).Load():
        if ev.HasField("session_log"):
            out.append([i, ev.step, "__session__", False, ev.session_log.status])
        if not ev.HasField("summary"):
            continue
        for v in ev.summary.value:
            has = v.HasField("metadata") and bool(v.metadata.plugin_data.plugin_name)
            if v.HasField("tensor"):
                arr = tensor_util.make_ndarray(v.tensor)
                val = float(arr) if arr.size == 1 else None
            else:
                val = v.simple_value
            if val is not None and (math.isnan(val) or math.isinf(val)):
                val = str(val)
            out.append([i, ev.step, v.tag, has, val])
print(json.dumps({"files": len(files), "records": out}))
