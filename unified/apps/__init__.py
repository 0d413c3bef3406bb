"""Applications on top of the unified model: evaluation commands that may use tasks/ (the
composition root unified/cli.py wires them into `cola`)."""
