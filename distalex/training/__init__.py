"""The training loop and what it needs: building a run, state, meters, schedule, evaluation, checkpoints."""
