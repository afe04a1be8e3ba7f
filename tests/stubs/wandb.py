"""A stand-in for Weights & Biases in tests/test_readme.py (W&B is not installed, and needs an
account): it appends what the README's callback logs to ``wandb_log.jsonl`` in the working
directory, from whichever process logs it."""
import json


def init(**kwargs):
    pass


def log(values: dict) -> None:
    with open("wandb_log.jsonl", "a") as f:
        f.write(json.dumps(values) + "\n")


class _Summary(dict):
    def update(self, values: dict) -> None:
        log({"summary": values})


summary = _Summary()
