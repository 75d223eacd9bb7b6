#!/usr/bin/env python
"""Entry point: ``accelerate launch [flags] launch/train.py [--config PATH]
[--split-mode single|ddp|model-parallel|hybrid] [key=value ...]`` (or plain ``python``)."""

import sys

from distalex.cli import main

if __name__ == "__main__":
    sys.exit(main())
