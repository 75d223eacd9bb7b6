#!/usr/bin/env python
"""Entry point: ``launch/predict.py CHECKPOINT ...`` (docs/use.md; ``--help`` lists the options)."""

import sys

from distalex.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
