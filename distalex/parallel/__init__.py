"""Placement: the mesh and process groups, the split modes (one placement object each), DDP options, launch glue, and communication accounting."""
