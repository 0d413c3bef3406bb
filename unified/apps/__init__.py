"""Applications on top of the unified model: evaluation commands that may use tasks/ (the
composition root unified/apps/cli.py wires them into `cola`)."""
