"""Block-causal DiT prior p_psi(z0) over one joint latent sequence (Cola DLM, DESIGN §3).

The whole model is this file. Per token it sees a latent z (any modality, zero-padded to the
widest modality), a timestep t, a modality id and a position; per sequence a boolean attention
mask built from the layout (prior/attention.py). It predicts the flow velocity u = eps - z0.

- modality-specific input / output projections into one shared width, plus a modality embedding;
- AdaLN-zero timestep conditioning *per token* (a clean position has t = 0 inside a noisy block).
  The modulation is "AdaLN-single" (PixArt-alpha): one shared t -> 6W projection plus a learned
  per-layer offset table, because per-layer AdaLN dominates the parameter count of small DiTs
  (DESIGN §7: 2.4M of 7.4M parameters);
- RoPE on (multi-axis) positions, QK-norm (RMSNorm on q and k), pre-norm blocks;
- KV cache: committed clean blocks are run once at t = 0 and their K/V appended (DESIGN §3).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from timm.layers import Mlp, RmsNorm

from .attention import attention, resolve_backend


class KVCache:
    """Per-layer keys/values of committed (clean, t = 0) tokens (validity masks are the caller's)."""

    def __init__(self, depth: int):
        self.k: list[torch.Tensor | None] = [None] * depth
        self.v: list[torch.Tensor | None] = [None] * depth

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def get(self, i: int):
        return self.k[i], self.v[i]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k[i] is None:
            self.k[i], self.v[i] = k, v
        else:
            self.k[i] = torch.cat([self.k[i], k], dim=2)
            self.v[i] = torch.cat([self.v[i], v], dim=2)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT). t [...] -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(positions: torch.Tensor, head_dim: int, axes: int, theta: float):
    """cos/sin [B, 1, L, head_dim/2] for positions [B, L] or [B, L, axes] (head dim split per axis)."""
    if positions.dim() == 2:
        positions = positions[..., None].expand(*positions.shape, axes)
    per_axis = head_dim // 2 // axes
    inv = theta ** (-torch.arange(per_axis, device=positions.device, dtype=torch.float32) / per_axis)
    angles = torch.cat([positions[..., a, None].float() * inv for a in range(axes)], dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = halves of the head dim. x [B, H, L, Dh]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RmsNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RmsNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x, rope, mask, backend, cache: KVCache | None, layer: int, commit: bool):
        b, n, w = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, L, Dh]
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        ck, cv = cache.get(layer) if cache is not None else (None, None)
        if ck is not None:  # per layer: a commit pass appends layer by layer
            k_all, v_all = torch.cat([ck, k], 2), torch.cat([cv, v], 2)  # [B, H, Lc + L, Dh]
        else:
            k_all, v_all = k, v
        if commit:  # True: every token of this call; an int n: its first n tokens
            keep = k.shape[2] if commit is True else int(commit)
            cache.append(layer, k[:, :, :keep], v[:, :, :keep])
        out = attention(q, k_all, v_all, mask, backend)  # [B, H, L, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.mod_offset = nn.Parameter(torch.zeros(6, width))  # per-layer AdaLN-single offsets

    def forward(self, x, mod, rope, mask, backend, cache, layer, commit):
        # mod [B, L, 6, W] shared modulation; add this layer's offsets
        sh1, sc1, g1, sh2, sc2, g2 = (mod + self.mod_offset).unbind(2)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), rope, mask, backend, cache,
                               layer, commit)  # [B, L, W]
        x = x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))  # [B, L, W]
        return x


class DiT(ModelMixin, ConfigMixin):
    """Shared block-causal flow prior. Saves/loads as config.json + safetensors (diffusers)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        modalities: dict[str, int] | list[list] | None = None,
        width: int = 256,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        rope_axes: int = 1,
        rope_theta: float = 10000.0,
        attn_backend: str = "auto",
    ):
        super().__init__()
        # Modality ids are positions in this order (text 0, image 1, as unified/layout.py).
        # Stored as a list of [name, dim] pairs: diffusers writes config.json with sorted keys,
        # which would silently reorder a dict (and swap the projections) on reload.
        pairs = list((modalities or {"text": 16}).items()) if isinstance(modalities, dict) or \
            modalities is None else [tuple(m) for m in modalities]
        self.register_to_config(modalities=[[name, int(d)] for name, d in pairs])
        modalities = dict(pairs)
        if width % heads or (width // heads) % (2 * rope_axes):
            raise ValueError("width/heads must be divisible by 2 * rope_axes")
        self.modality_names = list(modalities)
        self.latent_width = max(modalities.values())
        self.in_proj = nn.ModuleDict({m: nn.Linear(d, width) for m, d in modalities.items()})
        self.out_proj = nn.ModuleDict({m: nn.Linear(width, d) for m, d in modalities.items()})
        self.modality_embed = nn.Embedding(len(modalities), width)
        self.t_embed = Mlp(256, width, width, act_layer=nn.SiLU)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # AdaLN-single
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self._backend: str | None = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears; zero AdaLN (gates start closed: every block is the identity) and
        zero output projections (the initial velocity is 0), as in DiT's AdaLN-zero."""

        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.fc1.weight, std=0.02)
        nn.init.normal_(self.t_embed.fc2.weight, std=0.02)
        for lin in (self.adaln[-1], self.final_adaln[-1], *self.out_proj.values()):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for blk in self.blocks:
            nn.init.zeros_(blk.mod_offset)

    @property
    def backend(self) -> str:
        if self._backend is None:
            self._backend = resolve_backend(self.config.attn_backend, self.device)
        return self._backend

    def set_backend(self, name: str) -> None:
        self._backend = resolve_backend(name, self.device)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.depth)

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        modality: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        commit: bool | int = False,
    ) -> torch.Tensor:
        """Velocity for every token.

        z [B, L, Dmax] latents (zero-padded per modality), t [B, L] in [0, 1], modality [B, L]
        long, positions [B, L] or [B, L, axes], mask bool [B, L, Lc + L] (None = full), cache:
        committed K/V to attend to; commit=True appends this call's K/V to the cache, an int n
        appends only its first n tokens (a clean block run together with the next noisy one).
        Returns [B, L, Dmax].
        """
        cfg = self.config
        h = self.modality_embed(modality)  # [B, L, W]
        for i, name in enumerate(self.modality_names):
            d = self.in_proj[name].in_features
            proj = self.in_proj[name](z[..., :d])  # [B, L, W]
            h = h + (proj if len(self.modality_names) == 1 else proj * (modality == i)[..., None])
        temb = self.t_embed(timestep_embedding(t, 256))  # [B, L, W]
        mod = self.adaln(temb).unflatten(-1, (6, cfg.width))  # [B, L, 6, W]
        rope = rope_tables(positions, cfg.width // cfg.heads, cfg.rope_axes, cfg.rope_theta)
        for i, blk in enumerate(self.blocks):
            h = blk(h, mod, rope, mask, self.backend, cache, i, commit)  # [B, L, W]
        shift, scale = self.final_adaln(temb).chunk(2, dim=-1)  # [B, L, W] each
        h = modulate(self.final_norm(h), shift, scale)  # [B, L, W]
        out = z.new_zeros(*h.shape[:2], self.latent_width, dtype=h.dtype)
        for i, name in enumerate(self.modality_names):
            v = self.out_proj[name](h)  # [B, L, d]
            if len(self.modality_names) == 1:
                return v
            v = nn.functional.pad(v, (0, self.latent_width - v.shape[-1]))
            out = torch.where((modality == i)[..., None], v, out)
        return out  # [B, L, Dmax]
