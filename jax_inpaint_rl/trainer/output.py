"""The output folder of a run: one run at a time (a lock), every run's config kept, and which config changes a
resume can take.

All of it happens before anything is written, so a refused resume leaves the
folder as it was.
"""
import fcntl
import json
import os
import socket

from ml_collections import ConfigDict

LOCK_FILE = ".lock"
# what may differ between a run and its resume: nothing here changes the train state's structure, the data
# order or what the trained parameters mean
RESUMABLE = ("output_dir", "train.num_epochs", "train.max_train_steps", "train.max_nonfinite_steps",
             "train.learning_rate", "train.warmup_learning_rate", "train.warmup_steps", "train.autoencoder_steps",
             "model.path", "model.remat", "model.offload_text_encoders", "sample.eval_num_steps", "data.eval_path",
             "data.num_eval_examples", "reward.", "eval.", "checkpoint.", "mesh.", "distributed.")


class FolderLock:
    """An exclusive lock on output_dir/.lock for the life of a run (released by `release` or at exit)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RuntimeError(f"{output_dir} is in use by {holder} (lock {self.path}); wait for that run to end, "
                               "or choose another output_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()} on {socket.gethostname()}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def chosen_step(config, checkpointer) -> int | None:
    """The checkpoint a resume starts from: checkpoint.resume_step, or the latest; None when there is none."""
    if not config.checkpoint.resume:
        return None
    wanted, steps = config.checkpoint.resume_step, checkpointer.steps()
    if wanted < 0:
        return steps[-1] if steps else None
    if wanted not in steps:
        raise ValueError(f"config: checkpoint.resume_step={wanted}: no such checkpoint in "
                         f"{checkpointer.directory} (saved: {steps})")
    return wanted


def _flat(tree: dict, prefix: str = "") -> dict:
    items = {}
    for key, value in tree.items():
        items.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return items


def refused_changes(saved: dict, config: ConfigDict) -> list[str]:
    """The fields a saved run cannot continue under changed, as 'field: old -> new'."""
    old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    return [f"{name}: {old.get(name)!r} -> {new.get(name)!r}" for name in changed
            if not any(name == allowed or (allowed.endswith(".") and name.startswith(allowed))
                       for allowed in RESUMABLE)]


def check_resumable(config, checkpointer) -> None:
    """Refuse, before anything is written, a config the checkpoint to resume cannot continue under."""
    number = chosen_step(config, checkpointer)
    if number is None:
        return
    refused = refused_changes(json.loads(checkpointer.meta(number)["config"]), config)
    if refused:
        raise ValueError(f"{config.output_dir}: checkpoint {number} was trained with another config and cannot "
                         "resume with these changes:\n  " + "\n  ".join(refused)
                         + "\nuse another output_dir, or checkpoint.resume=False to start over")


def write_config(config) -> None:
    """config.json (this run's) and configs/NNN.json: every run in the folder keeps its config."""
    text = config.to_json_best_effort(indent=2)
    history = os.path.join(config.output_dir, "configs")
    os.makedirs(history, exist_ok=True)
    number = len([name for name in os.listdir(history) if name.endswith(".json")])
    for path in (os.path.join(config.output_dir, "config.json"), os.path.join(history, f"{number:03d}.json")):
        with open(path, "w") as f:
            f.write(text)
