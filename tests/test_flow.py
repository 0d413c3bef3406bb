"""Flow matching conventions (DESIGN §3): path, target, time sampling, grids, solvers, CFG."""

from __future__ import annotations

import pytest
import torch

from prior.flow import (
    SamplerConfig,
    cfg_combine,
    integrate,
    interpolate,
    predict_data,
    sample_logit_normal,
    shift_time,
    time_grid,
    velocity_target,
)


def _pair(seed: int = 0, shape=(2, 5, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ----------------------------------------------------------------------------- path / target


def test_path_endpoints_and_target():
    z0, eps = _pair()
    zeros, ones = torch.zeros(2, 5), torch.ones(2, 5)
    assert torch.equal(interpolate(z0, eps, zeros), z0)  # t = 0 is data
    assert torch.equal(interpolate(z0, eps, ones), eps)  # t = 1 is noise
    assert torch.equal(velocity_target(z0, eps), eps - z0)
    # per-token t broadcasts over the latent dim; midpoint is the average
    t = torch.rand(2, 5, generator=torch.Generator().manual_seed(1))
    zt = interpolate(z0, eps, t)
    torch.testing.assert_close(zt, (1 - t[..., None]) * z0 + t[..., None] * eps)
    torch.testing.assert_close(interpolate(z0, eps, torch.full((2, 5), 0.5)), (z0 + eps) / 2)
    # dz/dt along the path is the target
    h = 1e-3
    fd = (interpolate(z0, eps, t + h) - interpolate(z0, eps, t)) / h
    torch.testing.assert_close(fd, velocity_target(z0, eps), atol=1e-2, rtol=1e-2)
    # the data estimate from the true velocity is z0 at any t
    torch.testing.assert_close(predict_data(zt, velocity_target(z0, eps), t), z0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps,shift", [(1, 1.0), (3, 1.0), (8, 3.0), (13, 0.5)])
def test_exact_velocity_transports_noise_to_data(method, steps, shift):
    z0, eps = _pair(2)
    u = velocity_target(z0, eps)
    calls = []

    def velocity(z, t):
        calls.append(t.clone())
        assert z.shape == z0.shape and t.shape == z0.shape[:-1]
        return u

    out = integrate(velocity, eps.clone(), SamplerConfig(steps=steps, method=method, shift=shift))
    torch.testing.assert_close(out, z0, atol=1e-5, rtol=0)
    assert calls[0].eq(1.0).all(), "integration starts at t = 1"
    assert all(c.gt(0).all() for c in calls), "the velocity is never evaluated at t = 0"


def test_euler_evaluates_on_the_grid():
    cfg = SamplerConfig(steps=4, method="euler", shift=2.0)
    seen = []
    integrate(lambda z, t: (seen.append(float(t[0, 0])) or torch.zeros_like(z)), torch.zeros(1, 2, 3), cfg)
    torch.testing.assert_close(torch.tensor(seen), time_grid(4, 2.0)[:-1])


def test_solver_orders():
    """Time-dependent field v = 3 t^2 c: z(0) = z(1) - c. Euler is first order, Heun second."""
    c = torch.ones(1, 1)

    def error(method, steps):
        out = integrate(lambda z, t: 3 * t[..., None] ** 2 * c, torch.zeros(1, 1),
                        SamplerConfig(steps=steps, method=method))
        return float((out + c).abs())

    e8, e16 = error("euler", 8), error("euler", 16)
    h8, h16 = error("heun", 8), error("heun", 16)
    assert 1.7 < e8 / e16 < 2.3
    assert h16 < e16 / 10
    assert h8 / h16 > 3.5


# ----------------------------------------------------------------------------- grid / shift


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (8, 1.0), (8, 3.0), (5, 0.3)])
def test_time_grid(steps, shift):
    g = time_grid(steps, shift)
    assert g.shape == (steps + 1,)
    assert float(g[0]) == 1.0 and float(g[-1]) == 0.0
    assert (g[1:] < g[:-1]).all()


def test_shift_time():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    s = shift_time(t, 3.0)
    assert float(s[0]) == 0.0 and float(s[-1]) == 1.0
    assert (s[1:-1] > t[1:-1]).all(), "shift > 1 moves times toward 1 (noise)"
    assert (shift_time(t, 0.5)[1:-1] < t[1:-1]).all()
    torch.testing.assert_close(shift_time(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    with pytest.raises(ValueError):
        shift_time(t, 0.0)
    with pytest.raises(ValueError):
        time_grid(0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": -3},
        {"steps": 1001},
        {"shift": 0.0},
        {"shift": -1.0},
        {"shift": float("inf")},
        {"shift": float("nan")},
        {"method": "rk4"},
        {"guidance": -0.5},
        {"guidance": 51.0},
        {"guidance": float("nan")},
    ],
)
def test_sampler_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamplerConfig(**kwargs)


def test_sampler_config_accepts_good_values():
    SamplerConfig()
    SamplerConfig(steps=1, method="heun", shift=0.5, guidance=0.0)
    SamplerConfig(steps=1000, shift=10.0, guidance=50.0)


# ----------------------------------------------------------------------------- time sampling


def test_logit_normal():
    g = torch.Generator().manual_seed(0)
    t = sample_logit_normal((20000,), 0.0, 1.0, generator=g)
    assert t.shape == (20000,)
    assert (t > 0).all() and (t < 1).all()
    assert abs(float(t.median()) - 0.5) < 0.02
    hi = sample_logit_normal((20000,), 1.5, 1.0, generator=g)
    lo = sample_logit_normal((20000,), -1.5, 1.0, generator=g)
    assert float(lo.mean()) < float(t.mean()) < float(hi.mean())
    narrow = sample_logit_normal((20000,), 0.0, 0.1, generator=g)
    assert float(narrow.std()) < float(t.std()) / 3
    a = sample_logit_normal((3, 4), 1.0, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample_logit_normal((3, 4), 1.0, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- pinned tokens


def _pinned_problem():
    b, n, d = 2, 6, 3
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(b, n, d, generator=g)
    value = torch.randn(b, n, d, generator=g)
    pinned = torch.tensor([[True, True, False, False, False, False],
                           [False, False, True, False, True, False]])
    return noise, value, pinned


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_pinned_positions_stay_and_carry_t0(method):
    noise, value, pinned = _pinned_problem()
    grid = time_grid(5, 2.0)
    calls = []

    def velocity(z, t):
        calls.append(1)
        # pinned positions are clean (t = 0); the others run on the schedule
        assert torch.equal(t[pinned], torch.zeros(int(pinned.sum())))
        assert (t[~pinned] > 0).all() and (t[~pinned] == t[~pinned][0]).all()
        assert torch.isclose(grid, t[~pinned][0]).any()
        return torch.sin(z) + 1.0  # non-zero everywhere, also at pinned positions

    out = integrate(velocity, noise, SamplerConfig(steps=5, method=method, shift=2.0),
                    pinned=pinned, pinned_value=value)
    assert calls
    assert torch.equal(out[pinned], value[pinned])
    assert not torch.equal(out[~pinned], noise[~pinned])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_velocity_sees_pinned_values(method):
    """Every velocity evaluation (Heun's corrector too) sees pinned tokens at their clean value:
    they are labelled t = 0, so anything else feeds the model a corrupted clean token."""
    noise, value, pinned = _pinned_problem()
    seen = []

    def velocity(z, t):
        seen.append(torch.equal(z[pinned], value[pinned]))
        return torch.sin(z) + 1.0

    integrate(velocity, noise, SamplerConfig(steps=5, method=method, shift=2.0),
              pinned=pinned, pinned_value=value)
    assert len(seen) == (5 if method == "euler" else 9)
    assert all(seen), f"evaluations that saw pinned tokens off their value: {seen}"


# ----------------------------------------------------------------------------- CFG


def test_cfg_combine():
    vc, vu = _pair(5)
    # w = 1 is the conditional model, w = 0 the unconditional one (up to float rounding)
    torch.testing.assert_close(cfg_combine(vc, vu, 1.0), vc, atol=1e-6, rtol=0)
    assert torch.equal(cfg_combine(vc, vu, 0.0), vu)
    assert not torch.allclose(cfg_combine(vc, vu, 1.0), vu)
    torch.testing.assert_close(cfg_combine(vc, vu, 3.0), vu + 3.0 * (vc - vu))
