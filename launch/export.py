#!/usr/bin/env python
"""Entry point: ``launch/export.py CHECKPOINT ...`` (docs/use.md; ``--help`` lists the options)."""

import sys

from distalex.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
