#!/usr/bin/env python
"""Entry point: ``launch/export.py CHECKPOINT ...`` (docs/use.md; ``--help`` lists the options)."""

import sys

if __name__ == "__main__":
    try:
        from distalex.cli import export_main
    except KeyboardInterrupt:  # Ctrl-C while distalex itself is imported: one line, as export_main() prints
        print("distalex: stopped by SIGINT; the command did not start", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(export_main())
