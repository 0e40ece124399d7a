#!/usr/bin/env python3
"""Read a TensorBoard logdir with TensorBoard's own loaders and print JSON.

    python tests/support/read_tb.py --logdir D --loader python|rust [--timeout S]

Output (one JSON object on stdout):
    {"scalars":    {run: {tag: [[step, value, wall_time], ...]}},
     "histograms": {run: {tag: [[step, [[left, right, count], ...]], ...]}},
     "hparams":    {run: {name: value}},
     "session_starts": {run: [step, ...]} | null}

Non-finite floats are emitted as the strings "NaN", "Infinity", "-Infinity"
so the output stays strict JSON. Nothing is downsampled. `session_starts` is
only filled by the python loader: RustBoard ignores SessionLog events.

The point is to assert on what a TensorBoard user would see, so both paths go
through TensorBoard's data-provider API rather than parsing records ourselves:
  python -> EventMultiplexer + MultiplexerDataProvider (legacy Python loader)
  rust   -> the tensorboard-data-server binary (RustBoard) via TensorBoard's
            SubprocessServerDataIngester and its gRPC data provider.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

try:
    from tensorboard import context as tb_context
    from tensorboard.backend.event_processing import data_provider as tb_dp
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import metadata as hparams_metadata
except ImportError as e:  # the Rust tests surface this message verbatim
    sys.exit(
        "read_tb.py: the `tensorboard` package is not importable (%s); "
        "run scripts/setup.sh and use .venv/bin/python" % e
    )

EXPERIMENT = ""  # both providers serve one unnamed experiment
NO_DOWNSAMPLE = 10**9  # read_* require a bound; this is "everything"
PLUGINS_KEEP_ALL = ("scalars", "histograms", "hparams")


def jfloat(x):
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def collect(provider):
    """Everything except session_starts, through the DataProvider API."""
    ctx = tb_context.RequestContext()
    out = {"scalars": {}, "histograms": {}, "hparams": {}}

    scalars = provider.read_scalars(
        ctx, experiment_id=EXPERIMENT, plugin_name="scalars", downsample=NO_DOWNSAMPLE
    )
    for run, tags in scalars.items():
        out["scalars"][run] = {
            tag: [[d.step, jfloat(d.value), jfloat(d.wall_time)] for d in pts]
            for tag, pts in tags.items()
        }

    hists = provider.read_tensors(
        ctx, experiment_id=EXPERIMENT, plugin_name="histograms", downsample=NO_DOWNSAMPLE
    )
    for run, tags in hists.items():
        out["histograms"][run] = {
            tag: [
                [d.step, [[jfloat(v) for v in row] for row in d.numpy.reshape(-1, 3)]]
                for d in pts
            ]
            for tag, pts in tags.items()
        }

    # The hparams plugin itself only reads the summary metadata content, which
    # both providers expose as plugin_content; decode it with its own parser.
    hp = provider.list_tensors(ctx, experiment_id=EXPERIMENT, plugin_name="hparams")
    for run, tags in hp.items():
        ts = tags.get(hparams_metadata.SESSION_START_INFO_TAG)
        if ts is None:
            continue
        info = hparams_metadata.parse_session_start_info_plugin_data(ts.plugin_content)
        out["hparams"][run] = {k: hparam_value(v) for k, v in info.hparams.items()}
    return out


def hparam_value(v):
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        return jfloat(v.number_value)
    if kind in ("string_value", "bool_value"):
        return getattr(v, kind)
    return None


def read_python(logdir):
    mux = plugin_event_multiplexer.EventMultiplexer(
        size_guidance=plugin_event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE,
        tensor_size_guidance={p: 0 for p in PLUGINS_KEEP_ALL},
    )
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    out = collect(tb_dp.MultiplexerDataProvider(mux, logdir))
    out["session_starts"] = {
        run: session_starts(path) for run, path in sorted(mux.RunPaths().items())
    }
    return out


def session_starts(run_dir):
    # Same file set and order the loaders use: basenames containing "tfevents",
    # lexicographic = chronological.
    steps = []
    for name in sorted(n for n in os.listdir(run_dir) if "tfevents" in n):
        for ev in event_file_loader.EventFileLoader(os.path.join(run_dir, name)).Load():
            if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                steps.append(ev.step)
    return steps


class _RecordingSubprocess:
    """Stands in for the `subprocess` module inside server_ingester.

    The ingester keeps no handle on its child (only its stdin), so this is how
    we learn the PID to stop it, and how its log goes to a file we can read.
    """

    PIPE = subprocess.PIPE

    def __init__(self, log):
        self.log = log
        self.procs = []

    def Popen(self, args, **kw):
        # RUST_LOG overrides --verbose, and the Rust tests may well set it.
        env = dict(os.environ, RUST_LOG="info")
        proc = subprocess.Popen(args, stdout=self.log, stderr=self.log, env=env, **kw)
        self.procs.append(proc)
        return proc


def read_rust(logdir, timeout):
    from tensorboard.data import server_ingester
    from tensorboard.util import grpc_util

    binary = server_ingester.get_server_binary()  # NoDataServerError is clear enough
    with tempfile.TemporaryFile(mode="w+") as log:
        shim = _RecordingSubprocess(log)
        server_ingester.subprocess = shim
        ingester = server_ingester.SubprocessServerDataIngester(
            binary,
            logdir,
            reload_interval=0,  # -> --reload=once: one full pass, then just serve
            channel_creds_type=grpc_util.ChannelCredsType.LOCAL,
            samples_per_plugin={p: 0 for p in PLUGINS_KEEP_ALL},  # 0 -> "all"
            # --verbose makes the server log "Finished load cycle", our only
            # reliable signal that the data is complete (gRPC answers earlier).
            extra_flags=["--host=127.0.0.1", "--verbose"],
        )
        t0 = time.monotonic()
        try:
            ingester.start()
            wait_for_load(log, shim.procs[0], t0 + timeout)
            load_secs = time.monotonic() - t0
            out = collect(ingester.data_provider)
        finally:
            for proc in shim.procs:
                proc.kill()
                proc.wait()
    print("read_tb.py: RustBoard start+load took %.2fs" % load_secs, file=sys.stderr)
    out["session_starts"] = None
    return out


def wait_for_load(log, proc, deadline):
    while True:
        log.seek(0)
        text = log.read()
        if "Finished load cycle" in text:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(
                "read_tb.py: RustBoard did not finish loading (exit=%s); log tail:\n%s"
                % (proc.poll(), text[-2000:])
            )
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--loader", choices=("python", "rust"), required=True)
    ap.add_argument("--timeout", type=float, default=60, help="rust load timeout, seconds")
    args = ap.parse_args()
    if not os.path.isdir(args.logdir):
        sys.exit("read_tb.py: logdir %r is not a directory" % args.logdir)
    logdir = os.path.abspath(args.logdir)
    if args.loader == "python":
        out = read_python(logdir)
    else:
        out = read_rust(logdir, args.timeout)
    json.dump(out, sys.stdout, sort_keys=True, allow_nan=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
