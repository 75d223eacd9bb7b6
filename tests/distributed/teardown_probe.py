"""Run the CLI in this process, then print the threads the process still has (one line per rank).

Launched by test_teardown.py through ``accelerate launch``, like launch/train.py."""

import os
import sys

# Imported before the first count: their import may start threads of their own.
import torch.distributed  # noqa: F401

from distalex.cli import main


def native_threads() -> list:
    """Names of this process's OS threads (Linux)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                names.append(fh.read().strip())
        except OSError:
            pass
    return sorted(names)


if __name__ == "__main__":
    before = native_threads()
    rc = main(sys.argv[1:])
    after = native_threads()
    print(f"teardown-probe rank={os.environ.get('RANK', '0')} rc={rc} before={before} after={after}", flush=True)
    sys.exit(rc)
