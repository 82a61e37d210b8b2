#!/usr/bin/env bash
# Bootstrap a machine to run `python -m trainer`: an EC2 Deep Learning AMI, or any Linux box.
# Idempotent: a second run finds everything in place and installs nothing.
#
#   ./setup_ec2.sh            # run from the synced work dir (mnist-cloud does this on the first train --on)
#
# Python, in this order: $MNIST_CLOUD_PYTHON, the DLAMI's /opt/pytorch/bin/python, then a venv at
# ${MNIST_CLOUD_VENV:-~/.mnist-cloud/venv} created with --system-site-packages (so a system torch is reused).
# Only requirements that are *missing* are installed; an installed torch is never replaced, because
# on a DLAMI that costs minutes and gigabytes.
set -euo pipefail
cd "$(dirname "$0")"

if [ -n "${MNIST_CLOUD_PYTHON:-}" ]; then
    PY="$MNIST_CLOUD_PYTHON"
    why="\$MNIST_CLOUD_PYTHON"
elif [ -x /opt/pytorch/bin/python ]; then
    PY=/opt/pytorch/bin/python
    why="the Deep Learning AMI's PyTorch env"
else
    VENV="${MNIST_CLOUD_VENV:-$HOME/.mnist-cloud/venv}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "setup: creating $VENV (--system-site-packages)"
        python3 -m venv --system-site-packages "$VENV"
    fi
    PY="$VENV/bin/python"
    why="venv $VENV"
fi
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "setup: $PY is missing or older than Python 3.10; set MNIST_CLOUD_PYTHON to a newer interpreter" >&2
    exit 2
fi
echo "setup: python $("$PY" -c 'import sys; print(sys.version.split()[0])') at $PY ($why)"

# Requirements whose distribution is not installed at all (any installed version counts).
missing=$("$PY" - requirements.txt <<'EOF'
import re, sys
from importlib import metadata
for line in open(sys.argv[1]):
    req = line.split("#")[0].strip()
    if not req:
        continue
    name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(req)
EOF
)
if [ -n "$missing" ]; then
    echo "setup: installing $(echo "$missing" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    echo "$missing" | xargs -d '\n' "$PY" -m pip install -q --disable-pip-version-check
else
    echo "setup: all requirements already installed"
fi

"$PY" - <<'EOF'
import torch
cuda = torch.cuda.is_available()
gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
print(f"setup: torch {torch.__version__}, CUDA available: {cuda}, GPUs: {gpus}")
EOF
# The interpreter the remote runner uses for `python -m trainer`.
echo "$PY" > .mnist-cloud-python
