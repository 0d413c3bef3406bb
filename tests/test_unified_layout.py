"""The unified sequence: every task layout's mask against a brute force of DESIGN §3's rules."""

import pytest
import torch

from prior.dit import DiT
from unified.layout import (
    MODALITY_IMAGE,
    MODALITY_TEXT,
    SEG_C,
    SEG_I,
    SEG_N,
    SEG_P,
    TimeConfig,
    build_layout,
    image_to_text_segments,
    text_to_image_segments,
    text_to_text_segments,
)
from vaes.image_vae import grid_positions

TIMES = {MODALITY_TEXT: TimeConfig(1.0, 1.0), MODALITY_IMAGE: TimeConfig(0.5, 1.0)}
D = 16


def brute_force(lay, b):
    """Mask of row b from the rules in words (independent of prior.attention)."""
    n = lay.z.shape[1]
    s, blk, noisy = lay.meta.sample[b], lay.meta.block[b], lay.meta.noisy[b]
    drop, dr = bool(lay.cond_dropped[b].any()), lay.droppable[b]
    m = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if s[q] < 0 or s[k] < 0 or s[q] != s[k]:
                continue
            ok = (not noisy[k] and blk[k] < blk[q]) or (blk[k] == blk[q] and noisy[k] == noisy[q])
            if drop and dr[k] and not dr[q]:
                ok = False
            m[q, k] = ok
    return m


def rows(lay):
    return [(b, lay.attention_mask()[b]) for b in range(lay.z.shape[0])]


def text(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def check_against_brute_force(lay):
    for b, m in rows(lay):
        valid = lay.meta.sample[b] >= 0
        ref = brute_force(lay, b)
        assert torch.equal(m[valid][:, valid], ref[valid][:, valid])


@pytest.mark.parametrize("drop", [0.0, 1.0])
def test_all_three_task_layouts_match_the_rules(drop):
    grid = grid_positions(4, 4)
    samples = [
        text_to_text_segments(text(7, 0), text(12, 1)),
        text_to_image_segments(text(9, 2), torch.randn(16, D), grid),
        image_to_text_segments(text(3, 3), torch.randn(16, D), grid, text(5, 4), text(9, 5)),
    ]
    lay = build_layout(samples, block_size=4, times=TIMES, cond_drop_prob=drop,
                       generator=torch.Generator().manual_seed(0))
    check_against_brute_force(lay)


def test_structure_of_each_layout():
    grid = grid_positions(4, 4)
    lay = build_layout([text_to_image_segments(text(9, 2), torch.randn(16, D), grid)], 4, TIMES,
                       generator=torch.Generator().manual_seed(0))
    seg, noisy, blk = lay.segment[0], lay.meta.noisy[0], lay.meta.block[0]
    img_noisy = (seg == SEG_I) & noisy
    assert int(img_noisy.sum()) == 16 and blk[img_noisy].unique().numel() == 1  # one block
    assert lay.loss_mask[0].sum() == 16 and not lay.loss_mask[0][seg == SEG_C].any()
    t = lay.t[0][img_noisy]
    assert (t == t[0]).all() and 0 < t[0] < 1  # one time per image
    m = lay.attention_mask()[0]
    # the noisy image sees the whole caption and itself, bidirectionally
    assert m[img_noisy][:, seg == SEG_C].all() and m[img_noisy][:, img_noisy].all()

    lay = build_layout([image_to_text_segments(text(3, 3), torch.randn(16, D), grid, text(5, 4),
                                               text(9, 5))], 4, TIMES,
                       generator=torch.Generator().manual_seed(1))
    seg, noisy, blk = lay.segment[0], lay.meta.noisy[0], lay.meta.block[0]
    p, i = (seg == SEG_P) & ~noisy, (seg == SEG_I) & ~noisy
    assert blk[p].unique().tolist() == blk[i].unique().tolist()  # P + I: one block
    m = lay.attention_mask()[0]
    assert m[p][:, i].all() and m[i][:, p].all()  # bidirectional condition
    n_noisy = (seg == SEG_N) & noisy
    assert m[n_noisy][:, p | i].all() and m[n_noisy][:, (seg == SEG_C) & ~noisy].all()
    assert not m[p | i][:, seg == SEG_N].any()  # the condition never sees the caption
    assert lay.t[0][p | i].eq(0).all() and lay.loss_mask[0].sum() == 9


def test_image_to_text_cfg_drops_image_and_instruction_only():
    grid = grid_positions(4, 4)
    lay = build_layout([image_to_text_segments(text(3, 3), torch.randn(16, D), grid, text(5, 4),
                                               text(9, 5))], 4, TIMES, cond_drop_prob=1.0,
                       generator=torch.Generator().manual_seed(2))
    seg, noisy = lay.segment[0], lay.meta.noisy[0]
    m = lay.attention_mask()[0]
    n_noisy = (seg == SEG_N) & noisy
    assert not m[n_noisy][:, (seg == SEG_P) | (seg == SEG_I)].any()
    assert m[n_noisy][:, (seg == SEG_C) & ~noisy].all()  # the caption prefix stays
    pi = (seg == SEG_P) | (seg == SEG_I)
    assert m[pi][:, pi].all()


def test_a_two_axis_dit_runs_on_the_packed_tasks():
    grid = grid_positions(4, 4)
    samples = [text_to_text_segments(text(4, 0), text(8, 1)),
               text_to_image_segments(text(5, 2), torch.randn(16, D), grid)]
    lay = build_layout(samples, 4, TIMES, generator=torch.Generator().manual_seed(3))
    dit = DiT(modalities={"text": D, "image": D}, width=32, depth=2, heads=2, rope_axes=2,
              attn_backend="sdpa")
    v = dit(lay.z, lay.t, lay.modality, lay.positions, lay.attention_mask())
    assert v.shape == lay.z.shape and torch.isfinite(v).all()
    assert lay.positions.shape[-1] == 2
    assert (lay.modality[1][lay.segment[1] == SEG_I] == MODALITY_IMAGE).all()
    assert (lay.segment[0] == SEG_N).sum() == 16  # clean + noisy copies of the target
