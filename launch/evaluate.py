#!/usr/bin/env python
"""Entry point: ``[accelerate launch ...] launch/evaluate.py CHECKPOINT ...`` (docs/use.md; ``--help`` lists the options)."""

import sys

from distalex.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
