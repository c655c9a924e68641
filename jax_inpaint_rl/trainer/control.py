"""The state of the SFT control arm (train.sft_control): SFT from the warm-up's end for as many optimizer steps
as RL took, so that RL's gain is measured against more supervised training rather than against nothing.

The warm-up's end is what the arm starts from: the trainable params, their optimizer state and the EMA where
kept (ARM). The train state holds a copy of them under 'control' from the first step (created with the state,
so checkpoints always have it and a resume in RL keeps it), written when the warm-up ends; the control phase
swaps it with RL's trees, trains, and swaps back, so what the run exports is RL's.
"""
import jax
import jax.numpy as jnp

ARM = ("params", "opt_state", "ema")  # the state trees the control arm continues from
SLOT = "control"


def copied(tree):
    """A copy of `tree` in new buffers, each leaf placed as before (the train state's buffers are donated)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=jax.tree.map(lambda a: a.sharding, tree))(tree)


def with_slot(state: dict) -> dict:
    """The state with the arm's slot: a copy of its ARM trees (overwritten when the warm-up ends)."""
    return {**state, SLOT: copied({name: state[name] for name in ARM if name in state})}


def kept(state: dict) -> dict:
    """The state with its current ARM trees copied into the slot, where it has one (the warm-up's end)."""
    return with_slot(state) if SLOT in state else state


def swapped(state: dict) -> dict:
    """The slot's trees and the state's ARM trees exchanged (no copies)."""
    slot = state[SLOT]
    return {**state, **slot, SLOT: {name: state[name] for name in slot}}
