#!/usr/bin/env bash
# Bootstrap a machine to run `python -m trainer`: an EC2 Deep Learning AMI, or any Linux box.
# Idempotent: a second run finds everything in place and installs nothing.
#
#   ./setup_ec2.sh            # run from the synced work dir (mnist-cloud does this on the first train --on)
#   ./setup_ec2.sh --extra jupyterlab   # also these requirements, installed the same way (`mnist-cloud jupyter`)
#
# Python, in this order: $MNIST_CLOUD_PYTHON, the DLAMI's PyTorch env (${MNIST_CLOUD_DLAMI_ENV:-/opt/pytorch}),
# then a venv at ${MNIST_CLOUD_VENV:-~/.mnist-cloud/venv} created with --system-site-packages (so a system
# torch is reused). Only requirements that are *missing* are installed; an installed torch is never replaced,
# because on a DLAMI that costs minutes and gigabytes.
# Where the chosen env is not writable by this user (some DLAMIs keep /opt/pytorch root-owned), it installs
# with `sudo -n`, else into that venv layered over the env (it sees the env's torch). Nothing is recorded in
# .mnist-cloud-python until every requirement is in place.
set -euo pipefail
if [ "${1:-}" = "--extra" ]; then
    shift  # what is left in "$@" are the extra requirements
elif [ $# -gt 0 ]; then
    echo "usage: $0 [--extra REQUIREMENT...]" >&2
    exit 2
fi
cd "$(dirname "$0")"
# the tool's own requirements: requirements.txt beside this script in a checkout; a project that is not
# one gets them as .mnist-cloud-requirements.txt (its requirements.txt is its own)
REQUIREMENTS="${MNIST_CLOUD_REQUIREMENTS:-requirements.txt}"

DLAMI_ENV="${MNIST_CLOUD_DLAMI_ENV:-/opt/pytorch}"
VENV="${MNIST_CLOUD_VENV:-$HOME/.mnist-cloud/venv}"
if [ -n "${MNIST_CLOUD_PYTHON:-}" ]; then
    PY="$MNIST_CLOUD_PYTHON"
    why="\$MNIST_CLOUD_PYTHON"
elif [ -x "$DLAMI_ENV/bin/python" ] && [ -x "$VENV/bin/python" ]; then
    PY="$VENV/bin/python"  # an earlier run layered it over the DLAMI env, which it could not write to
    why="venv $VENV over the Deep Learning AMI's PyTorch env"
elif [ -x "$DLAMI_ENV/bin/python" ]; then
    PY="$DLAMI_ENV/bin/python"
    why="the Deep Learning AMI's PyTorch env"
else
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

# Requirements (the file's, then --extra's) whose distribution is not installed at all (any installed
# version counts).
missing=$("$PY" - "$REQUIREMENTS" "$@" <<'EOF'
import re, sys
from importlib import metadata
for line in [*open(sys.argv[1]), *sys.argv[2:]]:
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
writable() {  # can this user install into $1's site-packages?
    "$1" -c 'import os, sys, sysconfig; sys.exit(not os.access(sysconfig.get_paths()["purelib"], os.W_OK))'
}

layer_venv() {  # a venv at $VENV whose packages come on top of $1's (a venv of a venv would not see them)
    local base="$1" site
    echo "setup: $base is not writable and sudo -n is not allowed; installing into $VENV layered over it"
    rm -rf "$VENV"
    "$base" -m venv --system-site-packages "$VENV"
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$base" -c 'import site, sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' \
        > "$site/mnist-cloud-base.pth"
}

pip_install() {  # pip_install PREFIX... : install the missing requirements with that command prefix
    echo "$missing" | xargs -d '\n' "$@" -m pip install -q --disable-pip-version-check
}

if [ -n "$missing" ]; then
    echo "setup: installing $(echo "$missing" | tr '\n' ' ')"
    if writable "$PY"; then
        pip_install "$PY"
    elif sudo -n true 2>/dev/null; then
        echo "setup: $PY is not writable by $(id -un); installing with sudo -n"
        pip_install sudo -n "$PY"
    else
        layer_venv "$PY"
        PY="$VENV/bin/python"
        why="venv $VENV over $why"
        pip_install "$PY"
    fi
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
