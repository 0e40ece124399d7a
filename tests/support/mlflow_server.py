#!/usr/bin/env python3
"""Run a throwaway MLflow tracking server for one Rust integration test process.

    .venv/bin/python tests/support/mlflow_server.py --port P --dir D --parent-pid PID
        [--admin-password PW]

Starts `mlflow server` on 127.0.0.1:P with a SQLite store in D, in its own
process group, and prints exactly one line on stdout:
    READY http://127.0.0.1:P          once GET /health answers
    FAILED <reason and log tail>      (then exit 1)
It then stays alive as a watchdog: when PID is gone, or on SIGTERM/SIGINT/SIGHUP,
it kills the server's whole process group and exits. That way a test binary
that panics or is killed never leaves a server (and its port) behind.

With --admin-password the server runs MLflow's basic-auth app (`--app-name
basic-auth`, its user store in D/basic_auth.db): every API call needs HTTP Basic
credentials, and the admin user `admin` has the password PW. /health stays open.

Startup takes ~14 s on a fresh D (schema migrations) and ~8 s when D already
holds a migrated mlflow.db, on the 2-core machine; most of it is importing mlflow.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

POLL_SECS = 0.5


def server_command(port, data_dir, auth):
    db = os.path.join(data_dir, "mlflow.db")
    app = ["--app-name", "basic-auth"] if auth else []
    return [
        sys.executable, "-m", "mlflow", "server", *app,
        "--host", "127.0.0.1",
        "--port", str(port),
        # Four slashes: sqlite:/// + an absolute path.
        "--backend-store-uri", "sqlite:///" + db,
        "--artifacts-destination", os.path.join(data_dir, "artifacts"),
        "--workers", "1",  # tests are not load tests; saves ~250 MB per worker
    ]


def auth_config(data_dir, password):
    """Writes D/basic_auth.ini for MLflow's basic-auth app; returns its path."""
    path = os.path.join(data_dir, "basic_auth.ini")
    with open(path, "w") as f:
        f.write("[mlflow]\n")
        f.write("default_permission = READ\n")
        f.write("database_uri = sqlite:///%s\n" % os.path.join(data_dir, "basic_auth.db"))
        f.write("admin_username = admin\n")
        f.write("admin_password = %s\n" % password)
        f.write("authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def server_env(data_dir, password):
    env = dict(os.environ)
    if password is not None:
        env["MLFLOW_AUTH_CONFIG_PATH"] = auth_config(data_dir, password)
        # The auth app signs its sessions; any value does for a throwaway server.
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.urandom(16).hex()
    # The job runner (GenAI evaluation jobs) is not used by the tracking API but
    # costs 8 extra processes (~550 MB) and leaves a temp dir in /dev/shm.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def healthy(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def port_free(port):
    # Without this, /health could be answered by some other server on P.
    # SO_REUSEADDR as uvicorn sets it: TIME_WAIT leftovers of a previous
    # server on P must not count as "in use", a live listener still does.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie parent is as good as gone
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def kill_group(proc, grace=10.0):
    """TERM the whole group (mlflow CLI + uvicorn), then KILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so it does not linger as a zombie
            if not group_alive(proc.pid):
                return
            time.sleep(0.1)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def log_tail(path, n=3000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError as e:
        return "(no log: %s)" % e


def fail(msg):
    # One line on stdout keeps the protocol trivial for the Rust side.
    print("FAILED " + msg.replace("\n", "\\n"), flush=True)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description="MLflow server for integration tests")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True, help="data dir: mlflow.db, artifacts/, server.log")
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait for /health")
    ap.add_argument("--admin-password", help="run the basic-auth app; user admin has this password")
    args = ap.parse_args()

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))

    if not 0 < args.port < 65536:
        fail("port %d out of range" % args.port)
    data_dir = os.path.abspath(args.dir)
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        fail("cannot create data dir: %s" % e)
    log_path = os.path.join(data_dir, "server.log")
    if not port_free(args.port):
        fail("port %d on 127.0.0.1 is already in use" % args.port)

    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            server_command(args.port, data_dir, args.admin_password is not None),
            cwd=data_dir,  # anything mlflow drops in its cwd stays in D
            env=server_env(data_dir, args.admin_password),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group, so killpg gets uvicorn too
        )
    try:
        while not healthy(args.port):
            if proc.poll() is not None:
                fail("mlflow server exited with %s; log tail:\n%s" % (proc.returncode, log_tail(log_path)))
            if stop or not pid_alive(args.parent_pid):
                fail("cancelled while starting")
            if time.monotonic() - t0 > args.timeout:
                fail("no answer on /health after %.0fs; log tail:\n%s" % (args.timeout, log_tail(log_path)))
            time.sleep(0.2)
        print("READY http://127.0.0.1:%d" % args.port, flush=True)
        print("mlflow_server.py: healthy after %.1fs" % (time.monotonic() - t0), file=sys.stderr, flush=True)

        while not stop and pid_alive(args.parent_pid):
            if proc.poll() is not None:
                print("mlflow_server.py: server exited with %s; log tail:\n%s"
                      % (proc.returncode, log_tail(log_path)), file=sys.stderr, flush=True)
                sys.exit(1)
            time.sleep(POLL_SECS)
    finally:
        kill_group(proc)


if __name__ == "__main__":
    main()
