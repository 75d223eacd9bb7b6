#!/usr/bin/env bash
# Set up everything distalex needs on a fresh Debian/Ubuntu machine with Python 3.11:
# the real Fashion-MNIST files (Debian package), a virtual environment in .venv,
# and the package with its test and export extras.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,export]"
.venv/bin/python -c "import distalex, torch, torchvision, accelerate, wandb; print('distalex ready: torch', torch.__version__)"
