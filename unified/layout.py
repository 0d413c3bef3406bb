"""The joint latent sequence: segments, roles, blocks, positions, times and loss masks.

One `Layout` object drives the DiT's attention mask, RoPE positions, per-token times and the
flow loss (DESIGN §3 "Unified sequence"). Training uses the "2L" form: every row holds a clean
copy of all latents (t = 0, detached: stop-gradient on the history) followed by a noisy copy of
the target blocks; noisy block b sees clean blocks < b and itself (prior/attention.py).

Segments: P prompt text, C clean text (conditions), I image, N noisy text target.
Text-to-text on prose is [C][N]: a prefix of s tokens is the condition; its whole blocks are C,
and the trailing partial block's prompt tokens sit *inside* the first N block pinned at t = 0
("clean repaint"), exactly as generation places a prompt that does not end on a block boundary.
Classifier-free guidance drops the prompt: C and the pinned prompt tokens (both copies). The
rest of a dropped sample cannot see them, so a prompt shorter than a block (no C) still has an
unconditional branch to guide against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from prior.attention import TokenMeta, block_causal_mask, ensure_nonempty_rows
from prior.flow import interpolate, sample_logit_normal, velocity_target

SEG_PAD, SEG_P, SEG_C, SEG_I, SEG_N = -1, 0, 1, 2, 3
MODALITY_TEXT = 0


@dataclass
class Layout:
    """A batch of prior sequences. Every tensor is [B, N] or [B, N, D]."""

    z: torch.Tensor  # prior-space latents fed to the DiT
    t: torch.Tensor  # per-token time (0 = clean)
    modality: torch.Tensor
    positions: torch.Tensor
    meta: TokenMeta  # sample / block / stream for the attention rule
    segment: torch.Tensor  # SEG_*
    droppable: torch.Tensor  # bool: part of the condition that CFG drops (C, or P + I)
    cond_dropped: torch.Tensor  # bool: this token's sample has its condition dropped
    loss_mask: torch.Tensor  # bool: flow loss on this token
    target: torch.Tensor | None = None  # velocity target u = eps - z0 (training only)

    @property
    def valid(self) -> torch.Tensor:
        """[B, N] bool: a real token, not row padding."""
        return self.meta.sample >= 0

    def with_dropped(self, dropped: bool) -> Layout:
        """The same layout as one CFG branch: every sample's condition kept or dropped."""
        return dataclasses.replace(self, cond_dropped=torch.full_like(self.valid, dropped) & self.valid)

    def attention_mask(self) -> torch.Tensor:
        """[B, N, N] boolean mask: the block-causal rule, minus the droppable condition for
        the rest of a dropped sample (the condition itself is never hidden from itself)."""
        mask = block_causal_mask(self.meta, self.meta)
        hide = self.cond_dropped[:, :, None] & self.droppable[:, None, :]
        hide &= ~self.droppable[:, :, None]
        return ensure_nonempty_rows(mask & ~hide)


def per_sample_table(sample_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Gather table [B, S, ...] by sample id [B, L] (padding -> row 0) -> [B, L, ...]."""
    idx = sample_ids.clamp_min(0)
    if table.dim() == 2:
        return table.gather(1, idx)
    return table.gather(1, idx[..., None].expand(*idx.shape, table.shape[-1]))


def sample_lengths(sample_ids: torch.Tensor) -> torch.Tensor:
    """Tokens per sample [B, L] -> [B, L] (broadcast back to each token; 0 on padding)."""
    b, n = sample_ids.shape
    counts = torch.zeros(b, n + 1, dtype=torch.long, device=sample_ids.device)
    counts.scatter_add_(1, sample_ids.clamp_min(-1) + 1, torch.ones_like(sample_ids))
    return per_sample_table(sample_ids, counts[:, 1:]) * (sample_ids >= 0)


@dataclass(frozen=True)
class TimeConfig:
    """Per-modality logit-normal training time (loc is the paper's timeshift)."""

    loc: float = 1.0
    scale: float = 1.0


@dataclass(frozen=True)
class TextLayoutConfig:
    """How text is laid out and noised in training; `cond_drop_prob` is every task's CFG
    condition drop (the prompt blocks C of prose, the image of a caption, the caption of an
    image), so that the unconditional branch is learned."""

    block_size: int = 16
    time: TimeConfig = TimeConfig(loc=1.0, scale=1.0)  # loc: the paper's timeshift (~1.0 at d=16)
    uncond_prompt_prob: float = 0.3  # share of samples whose condition is only [bos]
    cond_drop_prob: float = 0.1


def text_to_text_layout(
    z0: torch.Tensor,
    sample_ids: torch.Tensor,
    positions: torch.Tensor,
    cfg: TextLayoutConfig,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
) -> Layout:
    """Training layout [clean z0 | noisy z_t] for packed text rows.

    z0 [B, L, d] prior-space latents (gradient flows into the noisy copy and the target, not
    into the clean history), sample_ids / positions [B, L] latent-level. Returns a 2L Layout.
    `rows` = (offset, total): these B rows are rows offset.. of a global batch of `total`;
    the random tables are drawn for all `total` rows and sliced, so a slice (a rank's share)
    gets exactly the draws a single process would give those rows.
    """
    b, n, _ = z0.shape
    dev = z0.device
    off, total = rows if rows is not None else (0, b)

    def rand(*shape, normal=False):  # [total, *shape] drawn, this slice's rows kept
        draw = torch.randn if normal else torch.rand
        return draw((total, *shape), device=dev, generator=generator)[off:off + b]

    valid = sample_ids >= 0
    bs = cfg.block_size
    block = positions // bs

    # condition length s per sample: [bos] only, or a uniform prefix of the sample
    lengths = sample_lengths(sample_ids)  # [B, L]
    u = per_sample_table(sample_ids, rand(n))
    keep_prompt = per_sample_table(sample_ids, rand(n) >= cfg.uncond_prompt_prob)
    s = torch.where(keep_prompt, 1 + (u * (lengths - 1).clamp_min(0)).long(), torch.ones_like(u).long())
    in_prompt = positions < s
    cond_block = block < (s // bs)  # whole blocks of the prompt: segment C
    pinned = in_prompt & ~cond_block  # prompt tokens inside the first target block

    # one t per (sample, block) for text (DESIGN §3), pinned tokens at t = 0
    if rows is None:
        n_blocks = int(block.max()) + 1 if n else 1
    else:  # the same table width on every slice
        n_blocks = (n - 1) // bs + 1 if n else 1
    t_table = sample_logit_normal((total, n, n_blocks), cfg.time.loc, cfg.time.scale,
                                  device=dev, generator=generator)[off:off + b]
    t_tok = per_sample_table(sample_ids, t_table)  # [B, L, n_blocks]
    t_tok = t_tok.gather(2, block[..., None]).squeeze(-1).masked_fill(pinned, 0.0)  # [B, L]
    eps = rand(n, z0.shape[-1], normal=True).to(z0.dtype)
    z_t = interpolate(z0, eps, t_tok.to(z0.dtype))
    z_t = torch.where(pinned[..., None], z0, z_t)

    dropped = per_sample_table(sample_ids, rand(n) < cfg.cond_drop_prob)
    segment = torch.where(cond_block, SEG_C, SEG_N).masked_fill(~valid, SEG_PAD)
    loss = valid & ~cond_block & ~pinned
    zeros = torch.zeros_like(valid)
    return Layout(
        z=torch.cat([z0.detach(), z_t], 1),  # [B, 2L, d]
        t=torch.cat([torch.zeros_like(t_tok), t_tok], 1),
        modality=torch.full((b, 2 * n), MODALITY_TEXT, device=dev, dtype=torch.long),
        positions=torch.cat([positions, positions], 1),
        meta=TokenMeta(torch.cat([sample_ids, sample_ids], 1), torch.cat([block, block], 1),
                       torch.cat([zeros, valid], 1)),
        segment=torch.cat([segment, segment.masked_fill(segment == SEG_C, SEG_PAD)], 1),
        droppable=torch.cat([in_prompt & valid, pinned & valid], 1),  # C and the pinned tail
        cond_dropped=torch.cat([dropped, dropped], 1),
        loss_mask=torch.cat([zeros, loss], 1),
        target=torch.cat([torch.zeros_like(z0), velocity_target(z0, eps)], 1),
    )


# --------------------------------------------------------------------------------------------
# The unified sequence: samples as lists of segments (DESIGN §3 "Unified sequence")

MODALITY_IMAGE = 1
TEXT_BLOCKS, ONE_BLOCK = "text", "one"


@dataclass
class Segment:
    """A run of one modality's latents in one sample.

    z0 [n, d] prior-space latents; positions [n, 2] (text: (p, p); image: (row, col), already
    offset to follow what precedes it); `target` segments are noised and carry the flow loss,
    the others are clean conditions (t = 0, no loss). `blocks` is TEXT_BLOCKS (cut at every
    block_size-th text position) or ONE_BLOCK (one bidirectional block, e.g. an image);
    `join_previous` puts the segment into the previous segment's last block (P + I form one
    bidirectional condition in image-to-text). `droppable` marks the condition CFG drops.
    `prompt` (text targets only): the first `prompt` tokens are given, not generated. Their
    whole blocks become a clean condition segment C, and the rest of them stay pinned at t = 0
    inside the first target block ("clean repaint"), exactly where generation puts a prompt
    that does not end on a block boundary; `prompt_droppable` lets CFG drop the whole prompt
    (its C blocks and its pinned tokens).
    """

    kind: int
    z0: torch.Tensor
    modality: int
    positions: torch.Tensor
    target: bool
    blocks: str = TEXT_BLOCKS
    join_previous: bool = False
    droppable: bool = False
    prompt: int = 0
    prompt_droppable: bool = False


def text_positions(start: int, n: int) -> torch.Tensor:
    """[n, 2] positions of n text tokens from `start` (both RoPE axes carry the index)."""
    p = torch.arange(start, start + n)
    return torch.stack([p, p], dim=-1)


def split_prompt(segments: list[Segment], block_size: int) -> list[tuple[Segment, int]]:
    """Expand every text target with a `prompt` into (C: its whole prompt blocks, clean) and
    (N: the rest, target); returns (segment, pinned leading tokens) pairs."""
    out = []
    for seg in segments:
        if not (seg.target and seg.prompt):
            out.append((seg, 0))
            continue
        whole = (seg.prompt // block_size) * block_size
        if whole:
            out.append((Segment(SEG_C, seg.z0[:whole], seg.modality, seg.positions[:whole],
                                False, seg.blocks, seg.join_previous,
                                droppable=seg.prompt_droppable), 0))
            seg = Segment(seg.kind, seg.z0[whole:], seg.modality, seg.positions[whole:], True,
                          seg.blocks, prompt=seg.prompt, prompt_droppable=seg.prompt_droppable)
        out.append((seg, seg.prompt - whole))
    return out


def segment_blocks(segments: list[Segment], block_size: int) -> list[torch.Tensor]:
    """Block id of every token of every segment, in order (ids increase along the sample)."""
    out, next_block, last = [], 0, -1
    for seg in segments:
        n = seg.z0.shape[0]
        if seg.blocks == ONE_BLOCK:
            b = last if seg.join_previous and last >= 0 else next_block
            ids = torch.full((n,), b, dtype=torch.long)
        else:
            rel = seg.positions[:, 0] - seg.positions[0, 0] if n else seg.positions[:, 0]
            first = last if seg.join_previous and last >= 0 else next_block
            ids = first + rel // block_size
        out.append(ids)
        if n:
            last = int(ids.max())
            next_block = last + 1
    return out


@dataclass(frozen=True)
class SegmentSpec:
    """A segment before encoding, as a task writes it: which of the sample's text pieces or
    images it holds (`source`), and its role. `place` turns specs plus latents into Segments,
    assigning positions in order: text continues after what precedes it, an image takes 2-D
    (row, col) positions offset past the text before it (DESIGN §3)."""

    kind: int
    modality: int
    source: int
    target: bool = False
    blocks: str = TEXT_BLOCKS
    join_previous: bool = False
    droppable: bool = False
    prompt: int = 0
    prompt_droppable: bool = False


def place(specs: list[SegmentSpec], texts: list[torch.Tensor], images: list[torch.Tensor],
          grid: torch.Tensor) -> list[Segment]:
    """Resolve specs to Segments: texts[i] [n, d] and images[i] [n_img, d'] are the latents of
    the sample's pieces; grid [n_img, 2] the (row, col) of image tokens."""
    out: list[Segment] = []
    for s in specs:
        pos = next_position(out)
        if s.modality == MODALITY_IMAGE:
            z, p = images[s.source], image_positions(grid.to(images[s.source].device), pos)
        else:
            z = texts[s.source]
            p = text_positions(pos, z.shape[0]).to(z.device)
        out.append(Segment(s.kind, z, s.modality, p, s.target, s.blocks, s.join_previous,
                           s.droppable, s.prompt, s.prompt_droppable))
    return out


def _tokens(seg: Segment, block: torch.Tensor, width: int, **given) -> dict[str, torch.Tensor]:
    """The per-token fields of one segment in a layout row, clean (t = 0, no loss, detached)
    unless `given` overrides them (the noisy copy: z, t, noisy, loss, target, droppable)."""
    n, dev = seg.z0.shape[0], seg.z0.device
    z0 = torch.nn.functional.pad(seg.z0, (0, width - seg.z0.shape[-1]))
    full = lambda v, dtype=None: torch.full((n,), v, dtype=dtype, device=dev)
    return dict(z=z0.detach(), t=full(0.0), modality=full(seg.modality),
                positions=seg.positions.to(dev), block=block.to(dev), segment=full(seg.kind),
                droppable=full(seg.droppable), noisy=full(False), loss=full(False),
                target=torch.zeros_like(z0)) | given


def _select(part: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in part.items()}


def stack_rows(rows: list[list[dict[str, torch.Tensor]]], dropped: list[bool], width: int,
               device: torch.device | str) -> Layout:
    """One Layout from rows of token parts (`_tokens`), one sample per row, right-padded. The
    one place that turns segments into a Layout: training (`build_layout`) and the prefix of
    generation (`condition_layout`) alike; `append_block` then extends such a Layout."""
    empty = _tokens(Segment(SEG_PAD, torch.zeros(0, width, device=device), MODALITY_TEXT,
                            torch.zeros(0, 2, dtype=torch.long, device=device), False),
                    torch.zeros(0, dtype=torch.long), width)
    cat = [{k: torch.cat([p[k] for p in [empty, *parts]]) for k in empty} for parts in rows]
    length = max((r["z"].shape[0] for r in cat), default=0)

    def stack(key, fill):
        return torch.stack([torch.cat([r[key], torch.full((length - r[key].shape[0],
                                                           *r[key].shape[1:]), fill,
                                                          dtype=r[key].dtype, device=device)])
                            for r in cat])

    n_valid = torch.tensor([r["z"].shape[0] for r in cat], device=device)
    valid = torch.arange(length, device=device)[None] < n_valid[:, None]
    sample = torch.where(valid, 0, -1)
    drop = torch.tensor(dropped, dtype=torch.bool, device=device)
    return Layout(
        z=stack("z", 0.0), t=stack("t", 0.0), modality=stack("modality", 0),
        positions=stack("positions", 0), meta=TokenMeta(sample, stack("block", 0),
                                                        stack("noisy", False)),
        segment=stack("segment", SEG_PAD), droppable=stack("droppable", False),
        cond_dropped=drop[:, None].expand(-1, length) & valid,
        loss_mask=stack("loss", False), target=stack("target", 0.0))


def build_layout(samples: list[list[Segment]], block_size: int,
                 times: dict[int, TimeConfig], cond_drop_prob: float | list[float] = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None) -> Layout:
    """2L training layout of heterogeneous samples, one sample per row (right-padded):
    [clean copy of the history | noisy copy of the target segments].

    One t per (sample, block), drawn from its modality's logit-normal; CFG drops a sample's
    droppable condition with probability `cond_drop_prob` (one value, or one per sample).
    `generator` may be a list, one per sample (each sample's draws then depend on it alone).
    The clean copy is detached (stop-gradient on the history) and holds only what some noisy
    block can see (blocks before the sample's last target block): the clean copy of the last
    target block would be computed for nothing. Gradients reach the latents through the noisy
    copy and the velocity target, as in the text-only layout.
    """
    d = max(seg.z0.shape[-1] for segs in samples for seg in segs)
    dev = samples[0][0].z0.device
    drop_probs = (cond_drop_prob if isinstance(cond_drop_prob, list)
                  else [cond_drop_prob] * len(samples))
    gens = generator if isinstance(generator, list) else [generator] * len(samples)
    rows, drops = [], []
    for segs, drop_prob, generator in zip(samples, drop_probs, gens):
        pairs = split_prompt(segs, block_size)
        segs = [s for s, _ in pairs]
        blocks = [b.to(dev) for b in segment_blocks(segs, block_size)]
        drops.append(bool(torch.rand((), device=dev, generator=generator) < drop_prob))
        last_target = max(int(b.max()) for s, b in zip(segs, blocks) if s.target and len(b))
        clean, noisy = [], []
        for (seg, pinned), blk in zip(pairs, blocks):
            n = seg.z0.shape[0]
            # pinned prompt tokens CFG drops (text-to-text: the whole prompt is the condition)
            pin_drop = (torch.arange(n, device=dev) < pinned) & seg.prompt_droppable
            seen = blk < last_target  # a clean token is history only for later noisy blocks
            if seen.any():
                clean.append(_select(_tokens(seg, blk, d, droppable=pin_drop | seg.droppable),
                                     seen))
            if seg.target:
                tc = times[seg.modality]
                uniq, inv = blk.unique(return_inverse=True)
                t = sample_logit_normal((len(uniq),), tc.loc, tc.scale, device=dev,
                                        generator=generator)[inv]
                free = torch.arange(n, device=dev) >= pinned  # pinned prompt: clean, no loss
                t = t * free
                z0 = torch.nn.functional.pad(seg.z0, (0, d - seg.z0.shape[-1]))
                eps = torch.randn(z0.shape, device=dev, generator=generator, dtype=z0.dtype)
                noisy.append(_tokens(seg, blk, d, z=interpolate(z0, eps, t.to(z0.dtype)), t=t,
                                     noisy=torch.ones_like(free), loss=free,
                                     target=velocity_target(z0, eps), droppable=pin_drop))
        rows.append(clean + noisy)
    return stack_rows(rows, drops, d, dev)


# --------------------------------------------------------------------------------------------
# generation: the same primitives, a block at a time (unified/generate.py)


def condition_layout(rows: list[list[Segment]], block_size: int, width: int,
                     device: torch.device | str) -> Layout:
    """The clean condition segments of every row (t = 0, block ids as in training): the
    prefix that generation encodes before its first block."""
    parts = [[_tokens(seg, blk, width) for seg, blk in zip(segs, segment_blocks(segs, block_size))]
             for segs in rows]
    return stack_rows(parts, [False] * len(rows), width, device)


def append_block(lay: Layout, z: torch.Tensor, t: torch.Tensor, modality: torch.Tensor,
                 positions: torch.Tensor, noisy: bool, droppable: torch.Tensor | None = None
                 ) -> Layout:
    """`lay` with one new block per row: z [B, n, D] at times t [B, n], one past each row's
    last block (a generated text block or an image). `noisy` marks the 2L noisy copy (a block
    being generated); clean (noisy=False) is a committed block joining the history.
    `droppable` [B, n] marks pinned prompt tokens CFG drops (default none); `with_dropped`
    sets the CFG branch of the whole layout."""
    b, n = z.shape[:2]
    dev = z.device
    last = torch.where(lay.valid, lay.meta.block, -1).amax(1, keepdim=True) if lay.z.shape[1] \
        else torch.full((b, 1), -1, dtype=torch.long, device=dev)
    ones = torch.ones(b, n, dtype=torch.bool, device=dev)
    cat = lambda a, x: torch.cat([a, x], 1)
    return Layout(
        z=cat(lay.z, z), t=cat(lay.t, t), modality=cat(lay.modality, modality),
        positions=cat(lay.positions, positions),
        meta=TokenMeta(cat(lay.meta.sample, torch.zeros(b, n, dtype=torch.long, device=dev)),
                       cat(lay.meta.block, (last + 1).expand(b, n)),
                       cat(lay.meta.noisy, ones if noisy else ~ones)),
        segment=cat(lay.segment, torch.full((b, n), SEG_N, device=dev)),
        droppable=cat(lay.droppable, ~ones if droppable is None else droppable.to(dev)),
        cond_dropped=cat(lay.cond_dropped, ~ones),
        loss_mask=cat(lay.loss_mask, ones & noisy))


# ------------------------------------------------------------------ positions


def image_positions(grid: torch.Tensor, offset: int) -> torch.Tensor:
    """Prior positions of image tokens [n, 2] (row, col) that follow `offset` text positions."""
    return grid + offset


def next_position(segments: list[Segment]) -> int:
    """The first position after a row of placed segments: one past the largest coordinate of
    any of them (text (p, p) and image (row, col) + offset alike). The one rule for where text
    or an image starts after what precedes it, in training (`place`) and generation."""
    return max((int(s.positions.max()) + 1 for s in segments if s.z0.shape[0]), default=0)
