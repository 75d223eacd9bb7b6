#!/usr/bin/env python
"""Entry point: ``accelerate launch [flags] launch/train.py [--config PATH]
[--split-mode single|ddp|model-parallel|hybrid] [key=value ...]`` (or plain ``python``)."""

import sys

if __name__ == "__main__":
    try:
        from distalex.cli import main
    except KeyboardInterrupt:  # Ctrl-C while distalex itself is imported: one line, as main() prints
        print("distalex: stopped by SIGINT; the command did not start", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(main())
