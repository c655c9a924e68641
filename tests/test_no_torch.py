"""The library imports and runs with torch unavailable (torch lives only in tools/ and tests/)."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib, pkgutil, sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by test)")

    sys.meta_path.insert(0, NoTorch())
    import jax, jax.numpy as jnp
    import jax_inpaint_rl
    for module in pkgutil.walk_packages(jax_inpaint_rl.__path__, "jax_inpaint_rl."):
        importlib.import_module(module.name)
    from jax_inpaint_rl.diffusion import rollout, schedules, steps
    denoise = lambda p, x, t, c: jnp.tanh(x * p)
    traj = rollout.rollout(denoise, 0.5, None, jnp.ones((2, 3)), schedules.sd3_schedule(3),
                           steps.Sampler("flow_grpo", 0.7), jax.random.key(0))
    assert traj.log_probs.shape == (2, 3)
    assert "torch" not in sys.modules, "torch was imported"
    print("ok")
""")


def test_library_runs_without_torch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
