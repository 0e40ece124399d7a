#!/usr/bin/env bash
# Create ./.venv and install scripts/requirements.txt (MLflow server, TensorBoard + RustBoard)
# for the integration tests and the demo. Safe to run repeatedly: pip only runs when the
# requirements changed since the last successful install, so CI can call this every time.
#   PYTHON=python3.11 scripts/setup.sh    # pick the interpreter (default: python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
REQS=scripts/requirements.txt
STAMP="$VENV/.requirements.sha256"

# mlflow 3.17 needs >= 3.10; the project is tested on 3.11.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup.sh: $PYTHON is $("$PYTHON" -V 2>&1); need Python >= 3.10" >&2; exit 1; }

# A venv whose interpreter no longer runs (e.g. the base Python was removed) is rebuilt.
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
    echo "setup.sh: using existing $VENV ($("$VENV/bin/python" -V 2>&1))"
else
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo "setup.sh: created $VENV with $("$VENV/bin/python" -V 2>&1)"
fi

# Hash with Python rather than sha256sum so this also runs where coreutils differ.
want="$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$REQS")"
if [ "$(cat "$STAMP" 2>/dev/null || true)" = "$want" ]; then
    echo "setup.sh: $REQS unchanged since last install; nothing to do"
    exit 0
fi

echo "setup.sh: installing $REQS (takes a few minutes on a fresh venv)"
rm -f "$STAMP"  # an interrupted install must not look complete
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQS"
# Fail here, not later in a test, if the RustBoard binary did not come with the wheel.
"$VENV/bin/python" -c 'import mlflow, tensorboard, tensorboard_data_server as s; assert s.server_binary(), "no RustBoard binary for this platform"'
echo "$want" > "$STAMP"
echo "setup.sh: installed; mlflow $("$VENV/bin/python" -c 'import mlflow; print(mlflow.__version__)'), tensorboard $("$VENV/bin/python" -c 'import tensorboard; print(tensorboard.__version__)')"
