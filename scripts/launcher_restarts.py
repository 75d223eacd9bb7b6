#!/usr/bin/env python
"""Does a launcher's restart start the process group?  ``torchrun --max-restarts 1``
runs 2 gloo workers N times; in each run rank 1 dies (SIGKILL) in the first attempt
and the restarted attempt must start its group and all-reduce.  Once with torch's
own start (``dist.init_process_group``), once with distalex's
(:func:`distalex.runtime.elastic.init_for_restarts`).  Not part of the tests (slow)::

    python scripts/launcher_restarts.py [N]        # default 10 runs each
"""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = """
import os, signal, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
timeout = timedelta(seconds=30)
if sys.argv[1] == "distalex":
    from distalex.runtime.elastic import init_for_restarts
    init_for_restarts(timeout, cuda=False)
else:
    dist.init_process_group("gloo", timeout=timeout)
t = torch.ones(1)
dist.all_reduce(t)
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(1)
dist.all_reduce(t)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        for start in ("torch", "distalex"):
            ok = 0
            for _ in range(runs):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max_restarts", "1",
                       "--monitor_interval", "1", "--master_port", str(free_port()), str(worker), start]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, timeout=300, env=env)
                ok += proc.returncode == 0
            print(f"{start:>8} start: {ok}/{runs} restarted runs finished", flush=True)


if __name__ == "__main__":
    main()
