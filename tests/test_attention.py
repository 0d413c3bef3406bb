"""Packed block-causal attention: the mask rule (against a brute-force reference), the backends
(against the fp32 reference), backend resolution and the CFG condition drop in Layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prior.attention import (
    TokenMeta,
    attention,
    block_causal_mask,
    ensure_nonempty_rows,
    resolve_backend,
    xformers_unavailable_reason,
)
from unified.layout import SEG_C, SEG_N, SEG_PAD, TextLayoutConfig, text_to_text_layout

SEEDS = (0, 1, 2, 3)


def random_meta(b: int, n: int, seed: int, max_block: int = 5) -> TokenMeta:
    """Rows packed with several samples (contiguous runs), trailing padding, random blocks and
    random streams."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.full((b, n), -1, dtype=torch.long)
    for row in range(b):
        pos, sid = 0, 0
        end = n - int(torch.randint(1, n // 4 + 1, (1,), generator=g))  # leave some padding
        while pos < end:
            length = int(torch.randint(1, n // 3 + 1, (1,), generator=g))
            sample[row, pos : min(end, pos + length)] = sid
            pos, sid = pos + length, sid + 1
    block = torch.randint(0, max_block, (b, n), generator=g)
    noisy = torch.rand(b, n, generator=g) < 0.5
    return TokenMeta(sample, block, noisy)


def brute_force_mask(q: TokenMeta, k: TokenMeta) -> torch.Tensor:
    """The rule in words, one (query, key) pair at a time."""
    b, lq = q.sample.shape
    lk = k.sample.shape[1]
    out = torch.zeros(b, lq, lk, dtype=torch.bool)
    for r in range(b):
        for i in range(lq):
            qs, qb, qn = int(q.sample[r, i]), int(q.block[r, i]), bool(q.noisy[r, i])
            for j in range(lk):
                ks, kb, kn = int(k.sample[r, j]), int(k.block[r, j]), bool(k.noisy[r, j])
                if ks == -1 or qs != ks:
                    continue  # other sample, or padding key
                if not qn:  # clean query: clean keys of blocks <= its own
                    ok = (not kn) and kb <= qb
                else:  # noisy query: earlier clean blocks, and the noisy tokens of its own block
                    ok = ((not kn) and kb < qb) or (kn and kb == qb)
                out[r, i, j] = ok
    return out


# ----------------------------------------------------------------------------- mask rule


@pytest.mark.parametrize("seed", SEEDS)
def test_block_causal_mask_matches_brute_force(seed):
    meta = random_meta(3, 40, seed)
    assert (meta.sample == -1).any() and meta.noisy.any() and (~meta.noisy).any()
    assert int(meta.sample.max()) >= 2  # several packed samples in a row
    got = block_causal_mask(meta, meta)
    assert got.dtype == torch.bool and got.shape == (3, 40, 40)
    assert torch.equal(got, brute_force_mask(meta, meta))


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_block_causal_mask_rectangular_matches_brute_force(seed):
    """Queries against a longer key set (cached history + current tokens)."""
    keys = random_meta(2, 30, seed)
    queries = TokenMeta(keys.sample[:, 18:], keys.block[:, 18:], keys.noisy[:, 18:])
    got = block_causal_mask(queries, keys)
    assert got.shape == (2, 12, 30)
    assert torch.equal(got, brute_force_mask(queries, keys))


@pytest.mark.parametrize("seed", SEEDS)
def test_block_causal_mask_structure(seed):
    meta = random_meta(3, 40, seed)
    m = block_causal_mask(meta, meta)
    qs, ks = meta.sample[:, :, None], meta.sample[:, None, :]
    qb, kb = meta.block[:, :, None], meta.block[:, None, :]
    qn, kn = meta.noisy[:, :, None], meta.noisy[:, None, :]
    assert not (m & (qs != ks)).any(), "cross-sample attention"
    assert not (m & (ks < 0)).any(), "attends padding"
    assert not (m & (qs < 0)).any(), "padding query attends something"
    assert not (m & kn & (qb != kb)).any(), "attends another block's noisy token"
    assert not (m & ~qn & kn).any(), "clean token attends a noisy token"
    assert not (m & (kb > qb)).any(), "attends a later block"
    assert not (m & qn & ~kn & (kb == qb)).any(), "noisy token sees the clean copy of its block"
    # every non-padding token sees itself
    valid = meta.sample >= 0
    diag = m.diagonal(dim1=1, dim2=2)
    assert torch.equal(diag, valid)


def test_two_l_layout_mask_by_hand():
    """One sample, 2 blocks of 2, [clean | noisy]: the textbook 2L pattern."""
    sample = torch.zeros(1, 8, dtype=torch.long)
    block = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]])
    noisy = torch.tensor([[False] * 4 + [True] * 4])
    m = block_causal_mask(TokenMeta(sample, block, noisy), TokenMeta(sample, block, noisy))[0]
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 0, 1, 1],
            [1, 1, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_ensure_nonempty_rows():
    mask = torch.tensor([[[True, False, False], [False, False, False], [False, True, True]]])
    out = ensure_nonempty_rows(mask)
    assert torch.equal(out[0, 0], mask[0, 0]) and torch.equal(out[0, 2], mask[0, 2])
    assert out[0, 1].all()


# ----------------------------------------------------------------------------- backends


def _cpu_backends() -> list[str]:
    return ["reference", "sdpa"]


def _qkv(b, h, lq, lk, dh, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, dh, generator=g)
    k = torch.randn(b, h, lk, dh, generator=g)
    v = torch.randn(b, h, lk, dh, generator=g)
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_backend_matches_reference_with_mask(backend, seed):
    meta = random_meta(3, 40, seed)
    mask = ensure_nonempty_rows(block_causal_mask(meta, meta))
    q, k, v = _qkv(3, 2, 40, 40, 8, seed)
    ref = attention(q, k, v, mask, "reference")
    out = attention(q, k, v, mask, backend)
    assert out.shape == (3, 2, 40, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_backend_matches_reference_without_mask_and_rectangular(backend):
    q, k, v = _qkv(2, 2, 5, 13, 8, 7)
    ref = attention(q, k, v, None, "reference")
    torch.testing.assert_close(attention(q, k, v, None, backend), ref, atol=1e-5, rtol=1e-5)
    keys = random_meta(2, 13, 5)
    queries = TokenMeta(keys.sample[:, 8:], keys.block[:, 8:], keys.noisy[:, 8:])
    mask = ensure_nonempty_rows(block_causal_mask(queries, keys))
    ref = attention(q, k, v, mask, "reference")
    torch.testing.assert_close(attention(q, k, v, mask, backend), ref, atol=1e-5, rtol=1e-5)


def test_reference_is_a_masked_softmax():
    """The reference itself: a key the mask hides has no influence on the output."""
    meta = random_meta(2, 16, 3)
    mask = ensure_nonempty_rows(block_causal_mask(meta, meta))
    q, k, v = _qkv(2, 2, 16, 16, 4, 3)
    out = attention(q, k, v, mask, "reference")
    v2 = v.clone()
    hidden_everywhere = ~mask.any(1)  # [B, Lk]: keys no query may see
    v2[hidden_everywhere[:, None, :, None].expand_as(v2)] = 1e6
    torch.testing.assert_close(attention(q, k, v2, mask, "reference"), out)
    # a row that may see only itself returns its own value
    eye = torch.eye(16, dtype=torch.bool).expand(2, 16, 16)
    torch.testing.assert_close(attention(q, k, v, eye, "reference"), v)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_matches_reference_on_cuda(dtype, atol):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    meta = random_meta(3, 40, 12)
    mask = ensure_nonempty_rows(block_causal_mask(meta, meta)).cuda()
    q, k, v = _qkv(3, 2, 40, 40, 16, 12, device="cuda", dtype=dtype)
    for m in (mask, None):
        ref = attention(q.float(), k.float(), v.float(), m, "reference")
        out = attention(q, k, v, m, "sdpa")
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


def _xformers_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device: xformers runs only on CUDA"
    return xformers_unavailable_reason("cuda")


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_xformers_matches_reference(dtype, atol):
    reason = _xformers_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    meta = random_meta(3, 40, 11)
    mask = ensure_nonempty_rows(block_causal_mask(meta, meta)).cuda()
    q, k, v = _qkv(3, 2, 40, 40, 16, 11, device="cuda", dtype=dtype)
    for m in (mask, None):
        ref = attention(q.float(), k.float(), v.float(), m, "reference")
        out = attention(q, k, v, m, "xformers")
        assert out.shape == ref.shape and out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("xformers", "cpu") == "sdpa"  # unavailable choice falls back
    assert resolve_backend("reference", "cpu") == "reference"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    assert xformers_unavailable_reason("cpu")  # a readable reason, not None
    with pytest.raises(ValueError, match="no-such-backend"):
        resolve_backend("no-such-backend", "cpu")


# ----------------------------------------------------------------------------- Layout / CFG drop


def _layouts():
    """The same layout drawn twice from one seed, condition never / always dropped."""
    b, n = 2, 12
    sample_ids = torch.tensor([[0] * 7 + [1] * 5, [0] * 10 + [-1] * 2])
    positions = torch.tensor([list(range(7)) + list(range(5)), list(range(10)) + [0, 0]])
    z0 = torch.randn(b, n, 4, generator=torch.Generator().manual_seed(0))
    out = []
    for prob in (0.0, 1.0):
        cfg = TextLayoutConfig(block_size=2, uncond_prompt_prob=0.0, cond_drop_prob=prob)
        out.append(text_to_text_layout(z0, sample_ids, positions, cfg, torch.Generator().manual_seed(2)))
    return out


def test_layout_mask_without_drop_is_the_block_causal_rule():
    kept, _ = _layouts()
    assert not kept.cond_dropped.any()
    for row, sid in ((0, 0), (0, 1), (1, 0)):  # every sample has a condition (seeded draw)
        assert ((kept.segment[row] == SEG_C) & (kept.meta.sample[row] == sid)).any()
    expected = ensure_nonempty_rows(brute_force_mask(kept.meta, kept.meta))
    assert torch.equal(kept.attention_mask(), expected)


def _expected_with_drop(lay) -> torch.Tensor:
    base = brute_force_mask(lay.meta, lay.meta)
    b, n = lay.segment.shape
    for r in range(b):
        for i in range(n):
            if not lay.cond_dropped[r, i] or lay.segment[r, i] == SEG_C:
                continue
            for j in range(n):
                if lay.segment[r, j] == SEG_C:
                    base[r, i, j] = False
    return ensure_nonempty_rows(base)


def test_layout_mask_hides_condition_of_dropped_samples():
    kept, dropped = _layouts()
    assert dropped.cond_dropped.all()
    # the draws are otherwise identical
    assert torch.equal(kept.segment, dropped.segment) and torch.equal(kept.t, dropped.t)
    m_kept, m_drop = kept.attention_mask(), dropped.attention_mask()
    assert torch.equal(m_drop, _expected_with_drop(dropped))
    seg = dropped.segment
    is_c_key = (seg == SEG_C)[:, None, :]
    non_c_query = (seg != SEG_C)[:, :, None]
    valid_q = (dropped.meta.sample >= 0)[:, :, None]
    assert not (m_drop & is_c_key & non_c_query & valid_q).any()
    assert (m_kept & is_c_key & non_c_query & valid_q).any(), "kept samples must see C"
    # the condition tokens themselves still see each other
    c_query = (seg == SEG_C)[:, :, None]
    assert torch.equal(m_drop & c_query, m_kept & c_query)
    assert set(seg.unique().tolist()) <= {SEG_PAD, SEG_C, SEG_N}


def test_layout_mask_drops_per_sample():
    kept, _ = _layouts()
    # drop the condition of sample 0 in row 0 only
    drop = (kept.meta.sample == 0) & (torch.arange(2)[:, None] == 0)
    lay = dataclasses.replace(kept, cond_dropped=drop)
    m = lay.attention_mask()
    assert torch.equal(m, _expected_with_drop(lay))
    m_kept = kept.attention_mask()
    # rows / samples that were not dropped are untouched
    untouched = ~drop[:, :, None].expand_as(m)
    assert torch.equal(m[untouched], m_kept[untouched])
    seg_c_row0 = (kept.segment[0] == SEG_C) & (kept.meta.sample[0] == 0)
    assert seg_c_row0.any(), "sample 0 of row 0 needs condition tokens"
    assert not torch.equal(m[0], m_kept[0])
