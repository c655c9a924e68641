"""Sampling schedules, computed on the host in float64 and handed to jit as fp32 arrays.

Each schedule is a dict of per-step arrays with a leading axis of length
`num_steps`, so `lax.scan` can slice one step at a time and a training batch can
gather per-sample steps with `take_steps`:
- flow matching: `model_t` (what the denoiser receives, sigma in [0, 1]),
  `sigma`, `sigma_next`, and `sigma_safe` (sigma with every fp32 value >= 1
  replaced by the schedule's first fp32 sigma below 1, normally its second sigma:
  the denominator Flow-GRPO uses to avoid 1/0);
- DDIM: `model_t` (integer DDPM timestep), `alpha_bar`, `alpha_bar_prev`.
They match diffusers' FlowMatchEulerDiscreteScheduler and DDIMScheduler as the
SD3 / Flux / SD1.5 pipelines configure them (tests compare them directly).
"""
import dataclasses
import math

import jax.numpy as jnp
import numpy as np

Schedule = dict[str, jnp.ndarray]


def sd3_shift(sigma, shift: float):
    """SD3's static shift: sigma' = s sigma / (1 + (s - 1) sigma)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


@dataclasses.dataclass(frozen=True)
class DynamicShift:
    """A FlowMatchEulerDiscreteScheduler with use_dynamic_shifting (Flux, Qwen-Image): the shift exponent mu is
    linear in the image token count, applied as an exponential (or linear) time shift, and with shift_terminal the
    shifted sigmas are stretched so the last one equals it. Defaults: Flux.1's scheduler config."""
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    shift_terminal: float | None = None
    time_shift: str = "exponential"  # or "linear"

    def __post_init__(self):
        if self.time_shift not in TIME_SHIFTS:
            raise ValueError(f"time_shift_type={self.time_shift!r}: expected one of {TIME_SHIFTS}")

    @classmethod
    def from_diffusers(cls, config, source: str = "scheduler config") -> "DynamicShift":
        """Read a scheduler_config.json dict; refuse a static shift or a setting that changes the sigmas otherwise,
        naming it."""
        problems = [f"{key}={config[key]!r} (supported: {value!r})" for key, value in DYNAMIC_SHIFT_ONLY.items()
                    if config.get(key, value) != value]
        if config.get("_class_name", FLOW_MATCH_EULER) != FLOW_MATCH_EULER:
            problems.append(f"_class_name={config['_class_name']!r}, expected {FLOW_MATCH_EULER!r}")
        if problems:
            raise ValueError(f"{source}: unsupported scheduler settings: {', '.join(problems)}")
        return cls(int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096)),
                   float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15)),
                   config.get("shift_terminal") or None, config.get("time_shift_type", "exponential"))

    def mu(self, image_seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_seq_len)

    def sigmas(self, num_steps: int, image_seq_len: int) -> np.ndarray:
        """The pipelines' linspace(1, 1/N, N), shifted by mu(image tokens) and stretched to shift_terminal."""
        sigmas, mu = np.linspace(1.0, 1.0 / num_steps, num_steps), self.mu(image_seq_len)
        if self.time_shift == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
        else:
            sigmas = mu / (mu + (1.0 / sigmas - 1.0))
        if self.shift_terminal:
            one_minus = 1.0 - sigmas
            sigmas = 1.0 - one_minus * (1.0 - self.shift_terminal) / one_minus[-1]
        return sigmas


FLOW_MATCH_EULER = "FlowMatchEulerDiscreteScheduler"
TIME_SHIFTS = ("exponential", "linear")
# scheduler settings that would change a dynamically shifted schedule, with the value that keeps it
DYNAMIC_SHIFT_ONLY = {"use_dynamic_shifting": True, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                      "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False}


def _flow_schedule(sigmas: np.ndarray) -> Schedule:
    sigmas = np.append(sigmas, 0.0)
    current, following = sigmas[:-1], sigmas[1:]
    # The 1 / (1 - sigma) guard is decided on the fp32 values the steps use: a float64
    # sigma such as 1 - 1e-9 or 1 + 2e-16 (SD3 shifts below 1 give these) passes a
    # float64 test but is 1.0 in fp32. Every fp32 sigma >= 1 takes the schedule's first
    # fp32 sigma below 1: Flow-GRPO's second sigma, unless that too rounds to 1.
    current32 = current.astype(np.float32)
    sigmas32 = sigmas.astype(np.float32)
    replacement = sigmas32[sigmas32 < 1.0][0]  # the appended final 0 is always there
    safe = np.where(current32 >= 1.0, replacement, current32)
    return {name: jnp.asarray(value, jnp.float32) for name, value in
            dict(model_t=current, sigma=current, sigma_next=following, sigma_safe=safe).items()}


def sd3_schedule(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> Schedule:
    """SD3 pipeline: timesteps linear between shifted sigma_max and sigma_min, then shifted."""
    sigma_min = sd3_shift(1.0 / num_train_timesteps, shift)
    sigmas = np.linspace(1.0, sigma_min, num_steps)
    return _flow_schedule(sd3_shift(sigmas, shift))


def shifted_schedule(num_steps: int, image_seq_len: int, shift: DynamicShift = DynamicShift()) -> Schedule:
    """Flux and Qwen-Image pipelines: sigmas linspace(1, 1/N, N), shifted by the image token count."""
    return _flow_schedule(shift.sigmas(num_steps, image_seq_len))


def scaled_linear_alpha_bar(beta_start: float = 0.00085, beta_end: float = 0.012,
                            num_train_timesteps: int = 1000) -> np.ndarray:
    """SD1.5's cumulative alphas: betas linear in sqrt space."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def ddim_schedule(num_steps: int, *, num_train_timesteps: int = 1000, steps_offset: int = 1,
                  spacing: str = "leading", set_alpha_to_one: bool = False,
                  alpha_bar: np.ndarray | None = None) -> Schedule:
    """DDIMScheduler.set_timesteps as SD1.5 configures it (leading spacing, offset 1)."""
    alpha_bar = scaled_linear_alpha_bar(num_train_timesteps=num_train_timesteps) if alpha_bar is None else alpha_bar
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        timesteps = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"ddim spacing {spacing!r}: expected 'leading' or 'trailing'")
    previous = timesteps - num_train_timesteps // num_steps
    final = 1.0 if set_alpha_to_one else alpha_bar[0]
    alpha_bar_prev = np.where(previous >= 0, alpha_bar[np.clip(previous, 0, None)], final)
    return {"model_t": jnp.asarray(timesteps, jnp.float32),
            "alpha_bar": jnp.asarray(alpha_bar[timesteps], jnp.float32),
            "alpha_bar_prev": jnp.asarray(alpha_bar_prev, jnp.float32)}


def num_steps(schedule: Schedule) -> int:
    return int(schedule["model_t"].shape[0])


def kept_steps(total: int, strength: float) -> int:
    """How many of `total` steps an inpainting / image-to-image `strength` in (0, 1] runs, as diffusers' pipelines
    count them (get_timesteps skips int(N - N * strength)): at least 1; strength 1 runs all."""
    return total - int(max(total - min(total * strength, total), 0))


def from_strength(schedule: Schedule, strength: float) -> Schedule:
    """The last `kept_steps` steps of `schedule`."""
    total = num_steps(schedule)
    return take_steps(schedule, np.arange(total - kept_steps(total, strength), total))


def take_steps(schedule: Schedule, step_index) -> Schedule:
    """Per-sample coefficients for integer step indices of any shape."""
    return {name: jnp.take(values, step_index, axis=0) for name, values in schedule.items()}
