"""Records of a run: metrics.jsonl and summary.json, wandb, plots, profiles, MFU and device peaks."""
