"""The unified sequence: every task layout's mask against a brute force of DESIGN §3's rules."""

import pytest
import torch

from prior.dit import DiT
from tasks import image_to_text, text_to_image, text_to_text
from unified.layout import (
    MODALITY_IMAGE,
    MODALITY_TEXT,
    SEG_C,
    SEG_I,
    SEG_N,
    SEG_P,
    TextLayoutConfig,
    TimeConfig,
    build_layout,
    place,
    text_to_text_layout,
)
from vaes.image_vae import grid_positions

TIMES = {MODALITY_TEXT: TimeConfig(1.0, 1.0), MODALITY_IMAGE: TimeConfig(0.5, 1.0)}
D = 16
GRID = grid_positions(4, 4)


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


def text(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def image(seed=9):
    return torch.randn(16, D, generator=torch.Generator().manual_seed(seed))


def t2t(n=19, prompt=7):
    return place(text_to_text.recipe(prompt), [text(n, 0)], [], GRID)


def t2i(n=9):
    return place(text_to_image.RECIPE, [text(n, 2)], [image()], GRID)


def i2t(p=3, n=14, prompt=5):
    return place(image_to_text.recipe(prompt), [text(p, 3), text(n, 4)], [image()], GRID)


def check_against_brute_force(lay):
    mask = lay.attention_mask()
    for b in range(lay.z.shape[0]):
        valid = lay.meta.sample[b] >= 0
        ref = brute_force(lay, b)
        assert torch.equal(mask[b][valid][:, valid], ref[valid][:, valid])


@pytest.mark.parametrize("drop", [0.0, 1.0])
def test_all_three_task_layouts_match_the_rules(drop):
    lay = build_layout([t2t(), t2i(), i2t(), i2t(prompt=1), t2t(prompt=1)], block_size=4,
                       times=TIMES, cond_drop_prob=drop, generator=torch.Generator().manual_seed(0))
    check_against_brute_force(lay)


def test_clean_copy_holds_only_what_some_noisy_block_sees():
    lay = build_layout([t2t(), t2i(), i2t()], 4, TIMES, generator=torch.Generator().manual_seed(1))
    m = lay.attention_mask()
    for b in range(3):
        valid, noisy = lay.meta.sample[b] >= 0, lay.meta.noisy[b]
        clean = valid & ~noisy
        seen = m[b][noisy & valid][:, clean].any(0)
        assert seen.all(), f"row {b}: a clean token no noisy token attends to"
    # text-to-image: no clean copy of the image; image-to-text: none of the answer's last block
    seg = lay.segment[1]
    assert not ((seg == SEG_I) & ~lay.meta.noisy[1]).any()


def test_structure_of_each_layout():
    lay = build_layout([t2i()], 4, TIMES, generator=torch.Generator().manual_seed(0))
    seg, noisy, blk = lay.segment[0], lay.meta.noisy[0], lay.meta.block[0]
    img_noisy = (seg == SEG_I) & noisy
    assert int(img_noisy.sum()) == 16 and blk[img_noisy].unique().numel() == 1  # one block
    assert lay.loss_mask[0].sum() == 16 and not lay.loss_mask[0][seg == SEG_C].any()
    t = lay.t[0][img_noisy]
    assert (t == t[0]).all() and 0 < t[0] < 1  # one time per image
    m = lay.attention_mask()[0]
    # the noisy image sees the whole caption and itself, bidirectionally
    assert m[img_noisy][:, seg == SEG_C].all() and m[img_noisy][:, img_noisy].all()
    # image positions are 2-D and follow the caption's 9 text positions
    assert lay.positions[0][img_noisy].min().item() == 9
    assert lay.positions[0][img_noisy].max().item() == 9 + 3

    lay = build_layout([i2t()], 4, TIMES, generator=torch.Generator().manual_seed(1))
    seg, noisy, blk = lay.segment[0], lay.meta.noisy[0], lay.meta.block[0]
    p, i = (seg == SEG_P) & ~noisy, (seg == SEG_I) & ~noisy
    assert blk[p].unique().tolist() == blk[i].unique().tolist()  # P + I: one block
    m = lay.attention_mask()[0]
    assert m[p][:, i].all() and m[i][:, p].all()  # bidirectional condition
    n_noisy = (seg == SEG_N) & noisy
    c = (seg == SEG_C) & ~noisy
    assert int(c.sum()) == 4  # the whole block of the 5-token prompt
    assert m[n_noisy][:, p | i].all() and m[n_noisy][:, c].all()
    assert not m[p | i][:, seg == SEG_N].any()  # the condition never sees the answer
    assert lay.t[0][p | i].eq(0).all()
    # the prompt's 5th token is pinned in the first answer block: t = 0, no loss
    first = n_noisy & (blk == blk[n_noisy].min())
    pinned = first & (lay.t[0] == 0)
    assert int(pinned.sum()) == 1 and not lay.loss_mask[0][pinned].any()
    assert lay.loss_mask[0].sum() == 14 - 5


def test_image_to_text_cfg_drops_image_and_instruction_only():
    lay = build_layout([i2t()], 4, TIMES, cond_drop_prob=1.0,
                       generator=torch.Generator().manual_seed(2))
    seg, noisy = lay.segment[0], lay.meta.noisy[0]
    m = lay.attention_mask()[0]
    n_noisy = (seg == SEG_N) & noisy
    assert not m[n_noisy][:, (seg == SEG_P) | (seg == SEG_I)].any()
    assert m[n_noisy][:, (seg == SEG_C) & ~noisy].all()  # the answer prefix stays
    pi = (seg == SEG_P) | (seg == SEG_I)
    assert m[pi][:, pi].all()


def first_axis(layout):
    pos = layout.positions[0]
    return pos[:, 0] if pos.dim() == 2 else pos


@pytest.mark.parametrize("drop", [0.0, 1.0])
def test_recipe_text_to_text_matches_the_packed_layout(drop):
    """The vectorized training layout of packed prose and the recipe form agree on the rule:
    same masks over (segment, block, stream) for the same prompt split, in both CFG branches.
    A dropped sample's targets see no prompt token at all: not C, not the pinned tail."""
    cfg = TextLayoutConfig(block_size=4, uncond_prompt_prob=0.0, cond_drop_prob=drop)
    n = 19
    z0 = text(n, 0)[None]
    pos = torch.arange(n)[None]
    for seed in range(6):
        packed = text_to_text_layout(z0, torch.zeros(1, n, dtype=torch.long), pos, cfg,
                                     torch.Generator().manual_seed(seed))
        # the prompt split the packed layout drew: pinned tokens + whole C blocks
        noisy = packed.meta.noisy[0]
        s = int(((packed.segment[0] == SEG_C) & ~noisy).sum()) + int(
            (noisy & (packed.t[0] == 0)).sum())
        lay = build_layout([t2t(n, s)], 4, TIMES, cond_drop_prob=drop,
                           generator=torch.Generator().manual_seed(0))
        for layout in (packed, lay):
            mask, where = layout.attention_mask()[0], first_axis(layout)
            target = layout.loss_mask[0]  # generated tokens
            sees_prompt = mask[target][:, (where < s) & layout.valid[0]].any()
            assert bool(sees_prompt) == (drop == 0.0)

        def signature(layout):
            m = layout.attention_mask()[0]
            v = layout.meta.sample[0] >= 0
            keys = [(int(p), bool(nz)) for p, nz in zip(first_axis(layout)[v].tolist(),
                                                        layout.meta.noisy[0][v].tolist())]
            mm = m[v][:, v]
            return {(keys[q], keys[k]) for q in range(len(keys)) for k in range(len(keys))
                    if mm[q, k]}

        sig_packed = signature(packed)
        # the packed layout also keeps the unused clean copy of the last block: compare on
        # what the recipe layout holds
        sig_recipe = signature(lay)
        assert sig_recipe <= sig_packed
        assert {x for x in sig_packed if x[0] in {k for k, _ in sig_recipe}
                and x[1] in {k for k, _ in sig_recipe}} == sig_recipe
        loss_packed = set(first_axis(packed)[packed.loss_mask[0]].tolist())
        loss_recipe = set(first_axis(lay)[lay.loss_mask[0]].tolist())
        assert loss_packed == loss_recipe


def test_a_two_axis_dit_runs_on_the_mixed_tasks():
    lay = build_layout([t2t(12, 4), t2i(5), i2t()], 4, TIMES,
                       generator=torch.Generator().manual_seed(3))
    dit = DiT(modalities={"text": D, "image": D}, width=32, depth=2, heads=2, rope_axes=2,
              attn_backend="sdpa")
    v = dit(lay.z, lay.t, lay.modality, lay.positions, lay.attention_mask())
    assert v.shape == lay.z.shape and torch.isfinite(v).all()
    assert lay.positions.shape[-1] == 2
    assert (lay.modality[1][lay.segment[1] == SEG_I] == MODALITY_IMAGE).all()
    # t2t with a 4-token prompt (one whole C block): clean C + clean first N block (seen by
    # the second), noisy copies of both N blocks
    assert int((lay.segment[0] == SEG_N).sum()) == 4 + 8


def test_clean_history_is_detached_and_targets_carry_gradient():
    z = text(14, 4).requires_grad_(True)
    segs = place(image_to_text.recipe(5), [text(3, 3), z], [image()], GRID)
    lay = build_layout([segs], 4, TIMES, generator=torch.Generator().manual_seed(4))
    lay.z[lay.meta.noisy].sum().backward(retain_graph=True)
    assert z.grad is not None and z.grad.abs().sum() > 0
    z.grad = None
    lay.z[~lay.meta.noisy & (lay.meta.sample >= 0)].sum().backward()
    assert z.grad is None or z.grad.abs().sum() == 0  # stop-gradient on the history


def test_image_and_text_targets_are_isolated():
    """DESIGN §3: in image-to-text the image condition never sees the answer (clean or noisy);
    in text-to-image the caption never sees the image and the image never sees another row's
    tokens; rows of different samples never see each other."""
    lay = build_layout([i2t(), t2i(), i2t(prompt=1)], 4, TIMES,
                       generator=torch.Generator().manual_seed(5))
    m = lay.attention_mask()
    for b in (0, 2):
        seg = lay.segment[b]
        img, ans = seg == SEG_I, (seg == SEG_N) | (seg == SEG_C)
        assert img.any() and ans.any()
        assert not m[b][img][:, ans].any()
        assert not lay.meta.noisy[b][img].any()  # a condition: clean only
    seg, noisy = lay.segment[1], lay.meta.noisy[1]
    cap, img = seg == SEG_C, seg == SEG_I
    assert not m[1][cap][:, img].any() and (img == noisy).all()  # only the target is noisy
    # one sample per row: the attention of a row involves that row only (padding excluded)
    assert (lay.meta.sample[lay.meta.sample >= 0] == 0).all()
