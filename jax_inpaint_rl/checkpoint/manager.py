"""Orbax checkpoints of the whole train state plus a JSON side-car (loader position, history).

The state pytree holds everything a bit-identical resume needs: trainable params,
optimizer state, EMA / old / reference params, rng, step counters. Saves are
asynchronous; `wait()` blocks until the last one is on disk. A step that cannot be
read back raises one `CheckpointError` naming the step, its folder and the saved
steps to choose from instead (orbax / TensorStore's own report runs to a hundred lines).
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

_CAUSE_CHARS = 300  # the root cause quoted in a CheckpointError, at most


class CheckpointError(RuntimeError):
    """A saved step is missing, corrupt or incomplete."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """Every saved step, ascending: what a resume may choose from when the latest is unreadable."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore into the structure, dtypes and shardings of `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._read(step, ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def meta(self, step: int) -> dict:
        """The JSON side-car of a step alone (the state is not read)."""
        return self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _read(self, step: int, args: ocp.args.Composite):
        saved = self.steps()
        folder = os.path.join(self.directory, str(step))
        if step not in saved:
            raise CheckpointError(f"{folder}: no checkpoint step {step} in {self.directory} (saved steps: {saved})")
        try:
            return self._manager.restore(step, args=args)
        except Exception as error:  # orbax and TensorStore raise ValueError, JSONDecodeError, bare Exception...
            cause = root_cause(error)
        # raised outside the handler: no chained context, whose TensorStore messages run to a hundred lines
        earlier = [s for s in saved if s < step]
        choice = (f"an earlier step can be chosen (saved steps: {saved}; e.g. checkpoint.resume_step={earlier[-1]})"
                  if earlier else f"no earlier step is saved (saved steps: {saved})")
        raise CheckpointError(f"{folder}: cannot restore checkpoint step {step}: it is corrupt or incomplete, or was "
                              f"saved for another state structure ({cause}); {choice}")


def root_cause(error: BaseException) -> str:
    """'Type: first line' of the innermost exception in the chain: TensorStore's outer ones print its spec."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        error = inner
        seen.add(id(error))
    first_line = (str(error).strip().splitlines() or [""])[0]
    if len(first_line) > _CAUSE_CHARS:
        first_line = first_line[:_CAUSE_CHARS] + "..."
    return f"{type(error).__name__}: {first_line}"
