"""Flow matching: the one place that defines the path, the target, time sampling and samplers.

Conventions (DESIGN §3), used everywhere else by import:
- path    z_t = (1 - t) * z0 + t * eps,  eps ~ N(0, I);  t = 1 is pure noise, t = 0 is data.
- target  u = eps - z0  (so dz/dt = u and integrating from t = 1 down to t = 0 transports noise
          to data); loss = mean squared error on the velocity.
- time    logit-normal t = sigmoid(loc + scale * n), n ~ N(0, 1) (Cola's "timeshift" is loc).
- sampling Euler (default) or Heun from t = 1 to t = 0, optionally on the SD3-shifted grid
          t' = s t / (1 + (s - 1) t).
- CFG     v = v_uncond + w (v_cond - v_uncond).
The timestep is per token: a position with t = 0 is clean and stays pinned while others move.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

SAMPLERS = ("euler", "heun")


def interpolate(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point on the path at time t (t broadcast over the trailing latent dim)."""
    t = t.unsqueeze(-1) if t.dim() == z0.dim() - 1 else t
    return (1.0 - t) * z0 + t * eps


def velocity_target(z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target u = eps - z0 (constant along a straight path)."""
    return eps - z0


def predict_data(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The data estimate z0_hat = z_t - t * v implied by a velocity at time t."""
    t = t.unsqueeze(-1) if t.dim() == z_t.dim() - 1 else t
    return z_t - t * v


def sample_logit_normal(
    shape: tuple[int, ...] | torch.Size,
    loc: float,
    scale: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times t = sigmoid(loc + scale * n); larger loc puts more mass near noise."""
    n = torch.randn(shape, device=device, generator=generator)
    return torch.sigmoid(loc + scale * n)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 schedule shift t' = s t / (1 + (s - 1) t); s > 1 spends more steps near noise."""
    if shift <= 0:
        raise ValueError(f"schedule shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None):
    """Decreasing times [1, ..., 0] with steps + 1 entries, shifted by `shift`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift_time(t, shift)


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance v = v_u + w (v_c - v_u); w = 1 is the conditional model."""
    return v_uncond + scale * (v_cond - v_uncond)


# The config's own checks (a SamplerConfig built in code, a preset). User input is checked
# before it gets here by unified/apps/inputs.py, with the same messages; prior/ imports
# nothing of the project, hence these few lines twice.
def _show(value) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and \
            abs(int(value)) >= 10**40:
        n, d = abs(int(value)), int(math.log10(abs(int(value))))
        while 10**d > n:  # log10 of a huge int may be off by one either way
            d -= 1
        while 10 ** (d + 1) <= n:
            d += 1
        return f"a {d + 1}-digit number"
    s = f"{value:g}" if isinstance(value, float) else repr(value)
    return s if len(s) <= 40 else s[:37] + "..."


def check_int(name: str, value, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi] (an integral float such as 8.0 is accepted, 8.5 is not),
    else a ValueError that names the knob."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        if not math.isfinite(value) or not float(value).is_integer():
            raise ValueError(f"{name} must be a whole number, got {_show(value)}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {_show(value)}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {_show(value)}")
    return int(value)


def check_real(name: str, value, lo: float, hi: float, *, low_open: bool = False) -> float:
    """`value` as a float in [lo, hi] ((lo, hi] with `low_open`); NaN, infinities and
    non-numbers are refused with a message that names the knob."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_show(value)}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {_show(value)}")
    if not ((lo < value if low_open else lo <= value) and value <= hi):
        g = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"  # noqa: E731
        span = (f"greater than {g(lo)}" + ("" if math.isinf(hi) else f" and at most {g(hi)}")
                if low_open else f"between {g(lo)} and {g(hi)}")
        raise ValueError(f"{name} must be {span}, got {_show(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range, with no upper bound
        raise ValueError(f"{name} must be a finite number, got {_show(value)}") from None


@dataclass(frozen=True)
class SamplerConfig:
    """Knobs of the per-block ODE solve."""

    steps: int = 8
    method: str = "euler"
    shift: float = 1.0
    guidance: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_int("steps", self.steps, 1, 1000))
        if self.method not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.method!r}; choose one of {SAMPLERS}")
        check_real("shift", self.shift, 0.0, math.inf, low_open=True)
        check_real("guidance", self.guidance, 0.0, 50.0)


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def integrate(
    velocity: VelocityFn,
    z: torch.Tensor,
    cfg: SamplerConfig,
    *,
    pinned: torch.Tensor | None = None,
    pinned_value: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate dz/dt = velocity(z, t_tok) from t = 1 to t = 0.

    z: [..., L, D] noise. `velocity` receives per-token times [..., L]. `pinned` ([..., L] bool)
    marks clean positions ("clean repaint"): they carry t = 0 and are reset to `pinned_value`.
    `callback(i, z, v, t_tok)` sees each step's start point, the velocity it moves along and
    the per-token time (e.g. to record the data estimate z - t v).
    """
    grid = time_grid(cfg.steps, cfg.shift, device=z.device)
    tok_shape = z.shape[:-1]
    if pinned is not None:
        z = torch.where(pinned.unsqueeze(-1), pinned_value, z)

    def t_tok(t: torch.Tensor) -> torch.Tensor:
        tt = t.expand(tok_shape)
        return tt.masked_fill(pinned, 0.0) if pinned is not None else tt

    for i in range(cfg.steps):
        t0, t1 = grid[i], grid[i + 1]
        v = velocity(z, t_tok(t0))
        if cfg.method == "heun" and i < cfg.steps - 1:
            z_pred = z + (t1 - t0) * v
            if pinned is not None:
                z_pred = torch.where(pinned.unsqueeze(-1), pinned_value, z_pred)
            v = 0.5 * (v + velocity(z_pred, t_tok(t1)))
        if callback is not None:
            callback(i, z, v, t_tok(t0))
        z = z + (t1 - t0) * v
        if pinned is not None:
            z = torch.where(pinned.unsqueeze(-1), pinned_value, z)
    return z
