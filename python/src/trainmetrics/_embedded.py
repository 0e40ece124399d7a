"""The embedded default: with no OTLP endpoint configured, `init()` uses a local
`trainmetrics serve` (the binary the wheel ships) on free loopback ports, shared by every trainer
of this machine that asks for the same TensorBoard logdir and MLflow tracking URI, as W&B's client
shares its service process.

State lives in `$TRAINMETRICS_STATE_DIR`, else `$XDG_STATE_HOME/trainmetrics/serve`, else
`~/.local/state/trainmetrics/serve`, per configuration key `<k>` (a hash of binary, logdir and
tracking URI):
- `<k>.lock`: `flock`ed while a trainer starts, joins or leaves, so two trainers never start two
  processes nor stop one the other just joined;
- `<k>.json`: the running process (pid, endpoints, logdir, tracking URI);
- `<k>.clients/<pid>.<n>`: one lease per run of a trainer process; leases of dead processes are pruned;
- `<k>.log`: the process's stdout and stderr (its shutdown report at the end);
- `<k>.yaml`: its config (`config()`).

The last trainer to leave stops it with SIGTERM (serve then writes every open window and ends)
and waits up to `stop_timeout` seconds. A trainer that was killed (SIGKILL, OOM) leaves its lease
behind: a watchdog process started with serve (`python -m trainmetrics._embedded --watch`)
prunes leases of dead processes every 2 s and stops serve once none is left, so no serve
outlives its trainers.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import uuid
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EmbeddedServeError

LISTENING = re.compile(r"^listening grpc=(\S+) http=(\S+) telemetry=(\S+)", re.M)
START_TIMEOUT_S = 30.0


def find_binary() -> Path:
    """The `trainmetrics` binary: `$TRAINMETRICS_BIN`, else the one this package's wheel
    installed into the environment's scripts directory, else the first on `PATH`.

    Raises `EmbeddedServeError` naming what was searched when there is none.
    """
    env = os.environ.get("TRAINMETRICS_BIN")
    if env:
        p = Path(env)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise EmbeddedServeError(f"TRAINMETRICS_BIN={env} is not an executable file")
        return p
    scripts = sysconfig.get_path("scripts")
    for where in (scripts, None):
        found = shutil.which("trainmetrics", path=where)
        if found:
            return Path(found)
    raise EmbeddedServeError(
        f"no trainmetrics binary: not in {scripts} (pip install ./python puts it there), not on PATH, "
        "and TRAINMETRICS_BIN is not set; or give init() an endpoint / set OTEL_EXPORTER_OTLP_ENDPOINT"
    )


def state_dir() -> Path:
    env = os.environ.get("TRAINMETRICS_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "trainmetrics" / "serve"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class EmbeddedServe:
    """A lease on the shared local `trainmetrics serve`.

    `http_endpoint` is the OTLP/HTTP metrics URL (`http://127.0.0.1:<port>/v1/metrics`);
    `logdir` the absolute TensorBoard logdir; `tracking_uri` MLflow's, or None.
    """

    key: str
    pid: int
    http_endpoint: str
    telemetry: str
    logdir: Path
    tracking_uri: str | None
    log_path: Path
    _lock_path: Path
    _lease: Path
    _child: subprocess.Popen[bytes] | None = None
    _released: bool = False
    _owner: int = field(default_factory=os.getpid)

    def release(self, stop_timeout: float = 20.0) -> str | None:
        """Drops this trainer's lease; the last one stops the process within `stop_timeout`
        seconds and gets its shutdown report (the log's lines after the stop). Idempotent."""
        if self._released or os.getpid() != self._owner:
            # A forked child holds a copy of its parent's lease, not one of its own.
            return None
        self._released = True
        with _Locked(self._lock_path):
            try:
                self._lease.unlink()
            except FileNotFoundError:
                pass
            if _live_leases(self._lease.parent):
                return None
            return _stop(self.pid, self._child, self.log_path, stop_timeout, self._lock_path.with_suffix(".json"))


class _Locked:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _Locked:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _live_leases(clients: Path) -> list[int]:
    live = []
    for lease in clients.glob("*"):
        try:
            pid = int(lease.name.split(".", 1)[0])
        except ValueError:
            continue
        if pid_alive(pid):
            live.append(pid)
        else:
            lease.unlink(missing_ok=True)
    return live


def _healthy(telemetry: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{telemetry}/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _forget(state: Path, pid: int) -> None:
    """Removes the state file if it still names `pid` (another serve may have replaced it)."""
    try:
        if int(json.loads(state.read_text())["pid"]) != pid:
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    state.unlink(missing_ok=True)


def _answers(telemetry: str, tries: int = 3) -> bool:
    for i in range(tries):
        if _healthy(telemetry):
            return True
        if i + 1 < tries:
            time.sleep(1.0)
    return False


def _stop(pid: int, child: subprocess.Popen[bytes] | None, log_path: Path, timeout: float, state: Path) -> str | None:
    offset = log_path.stat().st_size if log_path.exists() else 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _forget(state, pid)
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None:
            if child.poll() is not None:
                break
        elif not pid_alive(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        if child is not None:
            child.wait()
    _forget(state, pid)
    with open(log_path, "rb") as f:
        f.seek(offset)
        tail = f.read().decode("utf-8", "replace")
    # The report is serve's stdout; its log lines (stderr, timestamped) are left out.
    return "\n".join(line for line in tail.splitlines() if not re.match(r"^\s*\d{4}-\d\d-\d\dT|^\x1b", line)).strip() or None


def acquire(logdir: str | os.PathLike[str], tracking_uri: str | None) -> EmbeddedServe:
    """Joins the shared local serve for `logdir` and `tracking_uri`, starting it if none runs.

    Raises `EmbeddedServeError` when the binary is missing or the process does not start
    within 30 s (with the tail of its log).
    """
    binary = find_binary()
    logdir_abs = Path(logdir).resolve()
    key = hashlib.sha256(f"{binary.resolve()}\0{logdir_abs}\0{tracking_uri or ''}".encode()).hexdigest()[:16]
    base = state_dir()
    lock_path = base / f"{key}.lock"
    state_path = base / f"{key}.json"
    clients = base / f"{key}.clients"
    log_path = base / f"{key}.log"
    with _Locked(lock_path):
        clients.mkdir(parents=True, exist_ok=True)
        lease = clients / f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        state: dict[str, Any] | None = None
        if state_path.exists():
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError):
                state = None
        child = None
        # A live serve that does not answer at once (busy, paused) gets a few seconds before a
        # second one is started beside it.
        if state is None or not pid_alive(int(state["pid"])) or not _answers(state["telemetry"]):
            state, child = _start(binary, logdir_abs, tracking_uri, log_path)
            state_path.write_text(json.dumps(state))
        lease.write_text("")
        return EmbeddedServe(
            key=key,
            pid=int(state["pid"]),
            http_endpoint=f"http://{state['http']}/v1/metrics",
            telemetry=state["telemetry"],
            logdir=logdir_abs,
            tracking_uri=tracking_uri,
            log_path=log_path,
            _lock_path=lock_path,
            _lease=lease,
            _child=child,
        )


def config(logdir: Path, tracking_uri: str | None) -> dict[str, object]:
    """The embedded serve's config (serve's YAML, written as JSON): TensorBoard every step,
    MLflow every 100 steps with `train.loss` averaged over the window and the other metrics'
    last value. No reorder window: this package's reader sends each run's batches one at a
    time, in order, and retries a failed one before the next."""
    exporters: dict[str, object] = {"tensorboard": {"logdir": str(logdir), "every_steps": 1, "reorder_window": "0s"}}
    if tracking_uri:
        exporters["mlflow"] = {
            "tracking_uri": tracking_uri,
            "every_steps": 100,
            "reorder_window": "0s",
            "aggregation": "last",
            "metrics": {"train.loss": "mean"},
        }
    return {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": "127.0.0.1:0"}, "http": {"endpoint": "127.0.0.1:0"}}}},
        "service": {"telemetry": {"endpoint": "127.0.0.1:0"}},
        "exporters": exporters,
    }


def _start(binary: Path, logdir: Path, tracking_uri: str | None, log_path: Path) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    config_path = log_path.with_suffix(".yaml")
    # The tracking URI may hold credentials: only this user reads the file.
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(config(logdir, tracking_uri), indent=2))
    cmd = [str(binary), "serve", "--config", str(config_path)]
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as out:
        # Its own session: the trainer's Ctrl-C must not kill it before it drains; the last
        # trainer to leave stops it.
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        m = LISTENING.search(text)
        if m:
            grpc, http, telemetry = m.groups()
            _watch(child.pid, log_path)
            return {"pid": child.pid, "grpc": grpc, "http": http, "telemetry": telemetry, "logdir": str(logdir)}, child
        if child.poll() is not None:
            break
        time.sleep(0.05)
    if child.poll() is None:
        child.kill()
        child.wait()
    with open(log_path, "rb") as f:
        f.seek(offset)
        tail = f.read().decode("utf-8", "replace")[-2000:]
    raise EmbeddedServeError(f"{binary} serve did not start (exit {child.returncode}); its log ({log_path}):\n{tail}")


WATCH_INTERVAL_S = 2.0


def _watch(serve_pid: int, log_path: Path) -> None:
    """Starts the watchdog of `serve_pid` (module doc), detached from the trainer."""
    base = log_path.with_suffix("")
    subprocess.Popen(
        [sys.executable, "-m", "trainmetrics._embedded", "--watch", str(serve_pid), str(base)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def watch(serve_pid: int, base: Path) -> None:
    """The watchdog loop: stops `serve_pid` once no live trainer holds a lease in
    `<base>.clients`, and ends when serve has ended."""
    lock_path, clients, log_path = base.with_suffix(".lock"), base.with_suffix(".clients"), base.with_suffix(".log")
    state = base.with_suffix(".json")
    while pid_alive(serve_pid):
        time.sleep(WATCH_INTERVAL_S)
        with _Locked(lock_path):
            if not pid_alive(serve_pid):
                return
            if not _live_leases(clients):
                _stop(serve_pid, None, log_path, 30.0, state)
                return


__all__ = ["EmbeddedServe", "acquire", "find_binary", "state_dir", "watch"]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--watch":
        watch(int(sys.argv[2]), Path(sys.argv[3]))
