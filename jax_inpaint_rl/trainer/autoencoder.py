"""The first phase of a tiny model trained from scratch: its VAE fitted as an autoencoder on the training
images (latents kept near unit scale), so rewards computed on decoded pixels mean something.

The fitted components and their Adam state live in the train state ('base',
'autoencoder_opt'), so a SIGTERM mid-fit checkpoints and a resume continues at
the next step.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jax_inpaint_rl.trainer import checkpoints
from jax_inpaint_rl.trainer.run import Run, autoencoder_optimizer

LOG_EVERY = 50


def fit(run: Run) -> None:
    """train.autoencoder_steps steps from where the run stands (run.phase_step)."""
    steps, family, adam = run.config.train.autoencoder_steps, run.family, autoencoder_optimizer(run.config.train)

    def loss_fn(frozen, images):
        latents = family.encode_image(frozen, images)
        reconstruction = jnp.mean((family.decode(frozen, latents) - images) ** 2)
        return reconstruction + 0.1 * (jnp.std(latents) - 1.0) ** 2, reconstruction

    @jax.jit
    def fit_step(frozen, opt_state, images):
        (_, reconstruction), grads = jax.value_and_grad(loss_fn, has_aux=True)(frozen, images)
        updates, opt_state = adam.update(grads, opt_state, frozen)
        return optax.apply_updates(frozen, updates), opt_state, reconstruction

    for step in tqdm(range(run.phase_step, steps), desc="autoencoder fit", initial=run.phase_step, total=steps,
                     disable=steps == 0):
        batch = next(run.loaders["train"])
        pixels = [batch["image"]] + ([batch["target"]] if "target" in batch else [])
        base, opt_state, reconstruction = fit_step(run.state["base"], run.state["autoencoder_opt"],
                                                   run.shard(np.concatenate(pixels).astype(np.float32)))
        run.state = {**run.state, "base": base, "autoencoder_opt": opt_state}
        run.phase_step = step + 1
        if step % LOG_EVERY == 0 or step == steps - 1:
            run.log.write(step, {"autoencoder/reconstruction_mse": float(reconstruction)}, phase="autoencoder")
        checkpoints.stop_if_requested(run)
