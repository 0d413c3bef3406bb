"""Packed block-causal attention: the mask rule and the backends that apply it.

The rule (DESIGN §3, "2L" layout). Every token carries a sample id (-1 = padding), a block id
and a stream (clean copy z0, or noisy copy z_t). Query q may attend key k iff they belong to the
same sample and either
  - k is clean and block(k) <  block(q)            (history: earlier clean blocks), or
  - k and q are in the same stream and block(k) == block(q)   (bidirectional within a block).
So clean blocks see clean blocks <= their own, noisy block b sees clean blocks < b and itself,
and nothing ever sees a noisy token of another block or another sample.

Backends take q, k, v as [B, H, L, Dh] and a boolean mask [B, Lq, Lk] (True = may attend):
  reference  explicit softmax in fp32 (slow, the ground truth for tests)
  sdpa       torch.nn.functional.scaled_dot_product_attention with the boolean mask (any device)
  xformers   xformers.ops.memory_efficient_attention with an additive bias (CUDA only)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("cola.attention")

BACKENDS = ("reference", "sdpa", "xformers")


@dataclass
class TokenMeta:
    """Per-token attention metadata, each [B, L]."""

    sample: torch.Tensor  # long, -1 on padding
    block: torch.Tensor  # long
    noisy: torch.Tensor  # bool, True for the noisy stream

    def cat(self, other: TokenMeta) -> TokenMeta:
        return TokenMeta(
            torch.cat([self.sample, other.sample], 1),
            torch.cat([self.block, other.block], 1),
            torch.cat([self.noisy, other.noisy], 1),
        )


def block_causal_mask(q: TokenMeta, k: TokenMeta) -> torch.Tensor:
    """Boolean mask [B, Lq, Lk] of the packed 2L block-causal rule (see module docstring)."""
    same_sample = (q.sample[:, :, None] == k.sample[:, None, :]) & (k.sample[:, None, :] >= 0)
    qb, kb = q.block[:, :, None], k.block[:, None, :]
    history = ~k.noisy[:, None, :] & (kb < qb)
    same_block = (kb == qb) & (q.noisy[:, :, None] == k.noisy[:, None, :])
    return same_sample & (history | same_block)


def ensure_nonempty_rows(mask: torch.Tensor) -> torch.Tensor:
    """Let fully masked query rows (padding) attend everywhere so no backend yields NaN.

    Their outputs are garbage by construction and must be excluded from any loss.
    """
    return mask | ~mask.any(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# backends


def _reference(q, k, v, mask):
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float()).to(q.dtype)


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])


def _xformers(q, k, v, mask):
    import xformers.ops as xops

    bias = None
    if mask is not None:
        b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        # xformers wants the bias' last dim stored with a stride that is a multiple of 8
        store = torch.zeros(b, h, lq, (lk + 7) // 8 * 8, dtype=q.dtype, device=q.device)
        bias = store[..., :lk]
        bias.masked_fill_(~mask[:, None].expand(b, h, lq, lk), float("-inf"))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)


_IMPLS = {"reference": _reference, "sdpa": _sdpa, "xformers": _xformers}


def xformers_unavailable_reason(device: torch.device | str) -> str | None:
    """None when xformers can run on `device`, else a human-readable reason."""
    if torch.device(device).type != "cuda":
        return "xformers runs only on CUDA"
    try:
        import xformers.ops as xops
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return f"xformers import failed: {e}"
    try:
        x = torch.zeros(1, 8, 1, 16, device=device, dtype=torch.bfloat16)
        xops.memory_efficient_attention(x, x, x)
    except Exception as e:  # noqa: BLE001 - kernels built for another torch do not load
        return f"xformers kernels do not run here: {e}"
    return None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map 'auto' (or an unavailable choice) to a backend that runs on `device`, logging why."""
    if name not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS} or 'auto'")
    if name in ("auto", "xformers"):
        reason = xformers_unavailable_reason(device)
        if reason is None:
            return "xformers"
        if name == "xformers" or torch.device(device).type == "cuda":
            log.warning("attention: using SDPA instead of xformers (%s)", reason)
        return "sdpa"
    return name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Masked attention. q [B,H,Lq,Dh], k/v [B,H,Lk,Dh], mask bool [B,Lq,Lk] or None."""
    return _IMPLS[backend](q, k, v, mask)
