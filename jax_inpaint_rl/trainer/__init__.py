"""The training loop's phases over one `Run` (run.py): collection, updates, evaluation, checkpoints."""
