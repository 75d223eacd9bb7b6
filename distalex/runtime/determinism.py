"""Kernel choice: fast (cudnn.benchmark) or bitwise reproducible (``train.deterministic``).

On CPU distalex's kernels are deterministic already, which is why a resumed run
equals an uninterrupted one bit for bit there.  On GPUs two things break that:
cudnn.benchmark times several convolution algorithms on the first batches and
keeps the fastest, which can differ between two processes (a resumed run is a
new process), and some kernels (cuBLAS with its default workspace, atomics in
some cuDNN backward algorithms) sum in an order that varies between runs.
``train.deterministic`` turns both off:

* ``torch.backends.cudnn.benchmark = False`` (and cudnn's deterministic flag,
  set by ``use_deterministic_algorithms``);
* ``torch.use_deterministic_algorithms(True)``: an op without a deterministic
  kernel raises instead of silently varying;
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set), which cuBLAS reads
  when it starts, so :func:`configure` runs before the first CUDA work.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def configure(deterministic: bool, cudnn_benchmark: bool) -> None:
    """Set the process-wide kernel choice; call before anything touches CUDA."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark) and torch.cuda.is_available()


def describe() -> dict:
    """The settings in force, for the run's records."""
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }
