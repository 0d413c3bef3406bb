"""The joint latent sequence: segments, roles, blocks, positions, times and loss masks.

One `Layout` object drives the DiT's attention mask, RoPE positions, per-token times and the
flow loss (DESIGN §3 "Unified sequence"). Training uses the "2L" form: every row holds a clean
copy of all latents (t = 0, detached: stop-gradient on the history) followed by a noisy copy of
the target blocks; noisy block b sees clean blocks < b and itself (prior/attention.py).

Segments: P prompt text, C clean text (conditions), I image, N noisy text target.
Text-to-text on prose is [C][N]: a prefix of s tokens is the condition; its whole blocks are C,
and the trailing partial block's prompt tokens sit *inside* the first N block pinned at t = 0
("clean repaint"), exactly as generation places a prompt that does not end on a block boundary.
Classifier-free guidance drops C: the target region of a dropped sample cannot see C.
"""

from __future__ import annotations

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
    segment: torch.Tensor  # SEG_*; the C tokens are what CFG drops
    cond_dropped: torch.Tensor  # bool: this token's sample has its condition dropped
    loss_mask: torch.Tensor  # bool: flow loss on this token
    target: torch.Tensor | None = None  # velocity target u = eps - z0 (training only)

    def attention_mask(self) -> torch.Tensor:
        """[B, N, N] boolean mask: the block-causal rule, minus C for dropped samples."""
        mask = block_causal_mask(self.meta, self.meta)
        hide = self.cond_dropped[:, :, None] & (self.segment[:, None, :] == SEG_C)
        hide &= self.segment[:, :, None] != SEG_C  # the condition itself is never hidden
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
class TextLayoutConfig:
    block_size: int = 16
    time_loc: float = 1.0  # logit-normal loc ("timeshift"; ~1.0 suits latent dim 16)
    time_scale: float = 1.0
    uncond_prompt_prob: float = 0.3  # share of samples whose condition is only [bos]
    cond_drop_prob: float = 0.1  # CFG: drop C so the unconditional branch is learned


def text_to_text_layout(
    z0: torch.Tensor,
    sample_ids: torch.Tensor,
    positions: torch.Tensor,
    cfg: TextLayoutConfig,
    generator: torch.Generator | None = None,
) -> Layout:
    """Training layout [clean z0 | noisy z_t] for packed text rows.

    z0 [B, L, d] prior-space latents (gradient flows into the noisy copy and the target, not
    into the clean history), sample_ids / positions [B, L] latent-level. Returns a 2L Layout.
    """
    b, n, _ = z0.shape
    dev = z0.device
    valid = sample_ids >= 0
    bs = cfg.block_size
    block = positions // bs

    # condition length s per sample: [bos] only, or a uniform prefix of the sample
    lengths = sample_lengths(sample_ids)  # [B, L]
    u = per_sample_table(sample_ids, torch.rand(b, n, device=dev, generator=generator))
    keep_prompt = per_sample_table(
        sample_ids, torch.rand(b, n, device=dev, generator=generator) >= cfg.uncond_prompt_prob)
    s = torch.where(keep_prompt, 1 + (u * (lengths - 1).clamp_min(0)).long(), torch.ones_like(u).long())
    in_prompt = positions < s
    cond_block = block < (s // bs)  # whole blocks of the prompt: segment C
    pinned = in_prompt & ~cond_block  # prompt tokens inside the first target block

    # one t per (sample, block) for text (DESIGN §3), pinned tokens at t = 0
    n_blocks = int(block.max()) + 1 if n else 1
    t_table = sample_logit_normal((b, n, n_blocks), cfg.time_loc, cfg.time_scale, device=dev,
                                  generator=generator)
    t_tok = per_sample_table(sample_ids, t_table)  # [B, L, n_blocks]
    t_tok = t_tok.gather(2, block[..., None]).squeeze(-1).masked_fill(pinned, 0.0)  # [B, L]
    eps = torch.randn(z0.shape, device=dev, generator=generator, dtype=z0.dtype)
    z_t = interpolate(z0, eps, t_tok.to(z0.dtype))
    z_t = torch.where(pinned[..., None], z0, z_t)

    dropped = per_sample_table(
        sample_ids, torch.rand(b, n, device=dev, generator=generator) < cfg.cond_drop_prob)
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
        cond_dropped=torch.cat([dropped, dropped], 1),
        loss_mask=torch.cat([zeros, loss], 1),
        target=torch.cat([torch.zeros_like(z0), velocity_target(z0, eps)], 1),
    )
