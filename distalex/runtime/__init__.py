"""The process's environment: precision, determinism, restarts, host memory, signals, guarded file I/O, the run directory."""
