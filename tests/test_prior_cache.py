"""The 2L training forward equals KV-cached block-wise computation, block by block (DESIGN §3)."""

import pytest
import torch

from prior.attention import TokenMeta, block_causal_mask, ensure_nonempty_rows
from prior.dit import DiT
from unified.layout import TextLayoutConfig, text_to_text_layout


def random_dit(d=8, seed=0, **kw) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(modalities={"text": d}, width=32, depth=3, heads=2, attn_backend="sdpa", **kw)
    with torch.no_grad():  # leave AdaLN-zero: with zero gates every path would trivially agree
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return dit.eval()


def two_l_noisy_out(dit, z0, zt, t_tok, pos, bs):
    """Run the 2L layout [clean z0 | noisy z_t] (one sample) and return the noisy half."""
    b, n, _ = z0.shape
    zeros, ones = torch.zeros(b, n, dtype=torch.bool), torch.ones(b, n, dtype=torch.bool)
    meta = TokenMeta(torch.zeros(b, 2 * n, dtype=torch.long), torch.cat([pos, pos], 1) // bs,
                     torch.cat([zeros, ones], 1))
    mask = block_causal_mask(meta, meta)
    out = dit(torch.cat([z0, zt], 1), torch.cat([torch.zeros_like(t_tok), t_tok], 1),
              torch.zeros(b, 2 * n, dtype=torch.long), torch.cat([pos, pos], 1), mask)
    return out[:, n:]


def cached_blockwise(dit, z0, zt, t_tok, pos, bs):
    """Block b: noisy pass against the cache of clean blocks < b, then commit clean block b."""
    b, n, _ = z0.shape
    cache, outs = dit.new_cache(), []
    mod = torch.zeros(b, bs, dtype=torch.long)
    for s in range(0, n, bs):
        sl = slice(s, s + bs)
        mask = torch.ones(b, bs, cache.length + bs, dtype=torch.bool)
        outs.append(dit(zt[:, sl], t_tok[:, sl], mod, pos[:, sl], mask, cache=cache))
        dit(z0[:, sl], torch.zeros(b, bs), mod, pos[:, sl], mask, cache=cache, commit=True)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("bs", [1, 4, 8])
def test_2l_equals_kv_cached_blockwise(bs):
    dit = random_dit()
    torch.manual_seed(1)
    n = 24
    z0, zt = torch.randn(2, n, 8), torch.randn(2, n, 8)
    pos = torch.arange(n).expand(2, n)
    t_blk = torch.rand(2, n // bs)
    t_tok = t_blk.repeat_interleave(bs, 1)
    t_tok[:, 1] = 0.0  # a clean (pinned) position inside a noisy block
    with torch.no_grad():
        ref = two_l_noisy_out(dit, z0, zt, t_tok, pos, bs)
        fast = cached_blockwise(dit, z0, zt, t_tok, pos, bs)
    assert ref.abs().max() > 1e-2  # the comparison is not between zeros
    assert (ref - fast).abs().max().item() <= 1e-5


def test_packed_samples_do_not_interact():
    """Two samples packed in one row give the same outputs as each alone."""
    dit = random_dit(seed=3)
    torch.manual_seed(2)
    la, lb, bs = 8, 12, 4
    z = torch.randn(1, la + lb, 8)
    t = torch.rand(1, la + lb)
    pos = torch.cat([torch.arange(la), torch.arange(lb)])[None]
    sample = torch.cat([torch.zeros(la), torch.ones(lb)]).long()[None]
    noisy = torch.zeros(1, la + lb, dtype=torch.bool)
    meta = TokenMeta(sample, pos // bs, noisy)
    mod = torch.zeros(1, la + lb, dtype=torch.long)
    with torch.no_grad():
        packed = dit(z, t, mod, pos, block_causal_mask(meta, meta))
        for sl in (slice(0, la), slice(la, la + lb)):
            m = TokenMeta(sample[:, sl] * 0, pos[:, sl] // bs, noisy[:, sl])
            alone = dit(z[:, sl], t[:, sl], mod[:, sl], pos[:, sl], block_causal_mask(m, m))
            assert (packed[:, sl] - alone).abs().max().item() <= 1e-5


def test_training_layout_matches_cache_with_repaint_and_padding():
    """text_to_text_layout (random prompt split, pinned tail, packing, padding): each noisy
    block's output equals the cached block-wise computation of its own sample."""
    dit = random_dit(seed=5)
    cfg = TextLayoutConfig(block_size=4, uncond_prompt_prob=0.0, cond_drop_prob=0.0)
    g = torch.Generator().manual_seed(0)
    lens = [10, 7]
    n = 20  # 3 padding tokens
    sample = torch.full((1, n), -1)
    pos = torch.zeros(1, n, dtype=torch.long)
    o = 0
    for i, ln in enumerate(lens):
        sample[0, o:o + ln], pos[0, o:o + ln] = i, torch.arange(ln)
        o += ln
    z0 = torch.randn(1, n, 8, generator=g)
    lay = text_to_text_layout(z0, sample, pos, cfg, generator=g)
    assert (lay.t[0, n:][lay.loss_mask[0, n:]] > 0).all()
    with torch.no_grad():
        out = dit(lay.z, lay.t, lay.modality, lay.positions, lay.attention_mask())[:, n:]
        o = 0
        for ln in lens:
            sl = slice(o, o + ln)
            pad = (-ln) % 4  # complete the last block with throwaway tokens for the cached run
            zz0 = torch.cat([z0[:, sl], torch.zeros(1, pad, 8)], 1)
            zzt = torch.cat([lay.z[:, n:][:, sl], torch.zeros(1, pad, 8)], 1)
            tt = torch.cat([lay.t[:, n:][:, sl], torch.zeros(1, pad)], 1)
            pp = torch.arange(ln + pad)[None]
            fast = cached_blockwise(dit, zz0, zzt, tt, pp, 4)[:, :ln]
            # the throwaway tokens sit in the last block and are seen by its real tokens:
            # compare the complete blocks exactly
            full = ln - ln % 4
            assert (out[:, sl][:, :full] - fast[:, :full]).abs().max().item() <= 1e-5
            o += ln


def test_nonempty_rows_keeps_padding_finite():
    dit = random_dit(seed=7)
    meta = TokenMeta(torch.tensor([[0, 0, -1, -1]]), torch.zeros(1, 4, dtype=torch.long),
                     torch.zeros(1, 4, dtype=torch.bool))
    mask = ensure_nonempty_rows(block_causal_mask(meta, meta))
    out = dit(torch.randn(1, 4, 8), torch.rand(1, 4), torch.zeros(1, 4, dtype=torch.long),
              torch.arange(4)[None], mask)
    assert torch.isfinite(out).all()


def test_cache_buffers_grow_and_match_a_presized_cache():
    """A cache that starts too small grows (doubling) and gives what a presized one gives; the
    scratch K/V of an uncommitted call never become history."""
    dit = random_dit(seed=9)
    torch.manual_seed(3)
    z = torch.randn(2, 24, 8)
    pos = torch.arange(24).expand(2, 24)
    mod = torch.zeros(2, 4, dtype=torch.long)
    outs = []
    with torch.no_grad():
        for cache in (dit.new_cache(), dit.new_cache(capacity=64)):
            res = []
            for s in range(0, 24, 4):
                sl = slice(s, s + 4)
                mask = torch.ones(2, 4, cache.length + 4, dtype=torch.bool)
                res.append(dit(z[:, sl], torch.full((2, 4), 0.7), mod, pos[:, sl], mask, cache=cache))
                assert cache.length == s  # a noisy call leaves only scratch behind
                dit(z[:, sl], torch.zeros(2, 4), mod, pos[:, sl], mask, cache=cache, commit=True)
            assert cache.length == 24 and cache.k[0].shape[2] >= 24
            outs.append(torch.cat(res, 1))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-6 and outs[0].abs().max() > 1e-2


def test_exact_gelu_option_round_trips_and_stays_close_to_tanh(tmp_path):
    tanh = random_dit(seed=11)
    exact = DiT(modalities={"text": 8}, width=32, depth=3, heads=2, attn_backend="sdpa",
                act="gelu").eval()
    exact.load_state_dict(tanh.state_dict())
    exact.save_pretrained(tmp_path / "dit")
    loaded = DiT.from_pretrained(tmp_path / "dit", low_cpu_mem_usage=False).eval()
    assert loaded.config.act == "gelu" and tanh.config.act == "gelu_tanh"
    z, t = torch.randn(2, 8, 8), torch.rand(2, 8)
    mod, pos = torch.zeros(2, 8, dtype=torch.long), torch.arange(8).expand(2, 8)
    with torch.no_grad():
        a, b, c = (m(z, t, mod, pos, None) for m in (tanh, exact, loaded))
    assert torch.equal(b, c) and not torch.equal(a, b)
    assert (a - b).abs().max() <= 0.01 * a.abs().max()
    with pytest.raises(ValueError, match="activation"):
        DiT(act="relu6")


def test_compiled_blocks_equal_eager():
    """DiT.compile_blocks traces the pre/post-attention regions (dynamic shapes; the eager
    backend here keeps the test fast, inductor is what bench/generation.py --compile times)."""
    import copy

    dit = random_dit(seed=13)
    compiled = copy.deepcopy(dit)
    compiled.compile_blocks(backend="eager")
    torch.manual_seed(4)
    n, bs = 12, 4
    z0, zt = torch.randn(2, n, 8), torch.randn(2, n, 8)
    pos = torch.arange(n).expand(2, n)
    t_tok = torch.rand(2, n // bs).repeat_interleave(bs, 1)
    with torch.no_grad():
        ref = cached_blockwise(dit, z0, zt, t_tok, pos, bs)
        got = cached_blockwise(compiled, z0, zt, t_tok, pos, bs)
        two_l = two_l_noisy_out(compiled, z0, zt, t_tok, pos, bs)
    assert (ref - got).abs().max().item() <= 1e-5 and (ref - two_l).abs().max().item() <= 1e-5


def assert_grads_close(got: dict, ref: dict, rel: float = 1e-5) -> None:
    """Every parameter's gradient equal up to fp32 summation order (relative to its norm)."""
    for name, g in ref.items():
        err = (got[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= rel, f"{name}: relative error {err:.2e}"


def test_time_group_finds_the_runs_that_share_a_time():
    from prior.dit import time_group

    per_block = torch.arange(3).repeat_interleave(16).expand(2, 48)  # blocks of 16
    assert time_group(per_block) == 16
    assert time_group(per_block[:, :40]) == 8  # 40 = 5 aligned groups of 8
    assert time_group(torch.arange(6).repeat_interleave(4)[None]) == 4
    assert time_group(torch.tensor([[0, 0, 0, 1, 1, 1]])) == 1  # runs of 3: not aligned to 2
    assert time_group(torch.zeros(1, 7, dtype=torch.long)) == 1


@pytest.mark.parametrize("bs", [4, 3])
def test_grouped_modulation_equals_per_token(monkeypatch, bs):
    """The 2L training forward spreads AdaLN per group of G tokens sharing a time (G = 4 for
    blocks of 4; G = 1 when blocks of 3 do not align to 2): outputs and every gradient equal
    the per-token spread (time_group forced to 1)."""
    import prior.dit as dit_module

    dit = random_dit(seed=21).train()
    torch.manual_seed(5)
    n = 12
    z0, zt = torch.randn(2, n, 8), torch.randn(2, n, 8)
    pos = torch.arange(n).expand(2, n)
    t_tok = torch.rand(2, n // bs).repeat_interleave(bs, 1)

    def run():
        dit.zero_grad()
        out = two_l_noisy_out(dit, z0, zt, t_tok, pos, bs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in dit.named_parameters()}

    seen = []
    real = dit_module.time_group
    monkeypatch.setattr(dit_module, "time_group", lambda idx: seen.append(real(idx)) or seen[-1])
    grouped, grouped_grads = run()
    assert seen == [bs if bs == 4 else 1]
    monkeypatch.setattr(dit_module, "time_group", lambda idx: 1)
    ref, ref_grads = run()
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grouped_grads, ref_grads)


def test_per_token_modulation_path_equals_distinct_times(monkeypatch):
    """Training on an accelerator embeds every token's time (no unique(), which would wait for
    the device); the CPU embeds each distinct time once and spreads it. Both paths give the
    same outputs and gradients (the accelerator path, forced here on CPU)."""
    import prior.dit as dit_module

    dit = random_dit(seed=22).train()
    torch.manual_seed(6)
    n, bs = 12, 4
    z0, zt = torch.randn(2, n, 8), torch.randn(2, n, 8)
    pos = torch.arange(n).expand(2, n)
    t_tok = torch.rand(2, n // bs).repeat_interleave(bs, 1)
    t_tok[:, 1] = 0.0  # a pinned prompt token: runs no longer aligned

    def run():
        dit.zero_grad()
        out = two_l_noisy_out(dit, z0, zt, t_tok, pos, bs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in dit.named_parameters()}

    distinct, distinct_grads = run()
    monkeypatch.setattr(dit_module, "embed_distinct_times", lambda t: False)
    per_token, per_token_grads = run()
    torch.testing.assert_close(distinct, per_token, rtol=1e-4, atol=1e-5)  # matmul row order
    assert_grads_close(distinct_grads, per_token_grads)
