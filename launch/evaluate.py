#!/usr/bin/env python
"""Entry point: ``[accelerate launch ...] launch/evaluate.py CHECKPOINT ...`` (docs/use.md; ``--help`` lists the options)."""

import sys

if __name__ == "__main__":
    try:
        from distalex.cli import evaluate_main
    except KeyboardInterrupt:  # Ctrl-C while distalex itself is imported: one line, as evaluate_main() prints
        print("distalex: stopped by SIGINT; the command did not start", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(evaluate_main())
