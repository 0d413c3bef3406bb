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
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from timm.layers import Mlp, RmsNorm

from .attention import attention, resolve_backend


class KVCache:
    """Per-layer keys/values of committed (clean, t = 0) tokens, in preallocated buffers
    [B, H, capacity, Dh] (validity masks are the caller's).

    A call writes its new K/V right after the committed ones, so attention reads one view
    [:, :, :length + new] and nothing is concatenated; the first `keep` new tokens (a commit)
    advance the length, the others are scratch that the next call overwrites. A buffer grows
    by doubling when a call does not fit (`capacity` presizes it)."""

    def __init__(self, depth: int, capacity: int = 0):
        self.capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * depth
        self.v: list[torch.Tensor | None] = [None] * depth
        self.n = [0] * depth

    @property
    def length(self) -> int:
        return self.n[0]

    def get(self, i: int):
        if self.k[i] is None or self.n[i] == 0:
            return None, None
        return self.k[i][:, :, : self.n[i]], self.v[i][:, :, : self.n[i]]

    def extend(self, i: int, k: torch.Tensor, v: torch.Tensor, keep: int):
        """Write k, v [B, H, L, Dh] after layer i's committed tokens, commit the first `keep`
        of them; returns keys and values of committed + new tokens [B, H, n + L, Dh]."""
        n, m = self.n[i], k.shape[2]
        buf = self.k[i]
        if buf is None or buf.shape[2] < n + m:
            cap = max(n + m, self.capacity, 0 if buf is None else 2 * buf.shape[2])
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if n:
                new_k[:, :, :n], new_v[:, :, :n] = buf[:, :, :n], self.v[i][:, :, :n]
            self.k[i], self.v[i] = new_k, new_v
        self.k[i][:, :, n:n + m] = k
        self.v[i][:, :, n:n + m] = v
        self.n[i] = n + keep
        return self.k[i][:, :, :n + m], self.v[i][:, :, :n + m]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.extend(i, k, v, k.shape[2])


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT). t [...] -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(positions: torch.Tensor, head_dim: int, axes: int, theta: float):
    """cos/sin [B, L, 1, 1, head_dim/2] (fp32) for positions [B, L] or [B, L, axes] (head dim
    split per axis); they broadcast over (q|k, head) of a [B, L, 2, H, head_dim] tensor."""
    if positions.dim() == 2:
        positions = positions[..., None].expand(*positions.shape, axes)
    per_axis = head_dim // 2 // axes
    inv = theta ** (-torch.arange(per_axis, device=positions.device, dtype=torch.float32) / per_axis)
    angles = (positions[..., :axes].float()[..., None] * inv).flatten(-2)  # [B, L, axes * per_axis]
    return angles.cos()[:, :, None, None], angles.sin()[:, :, None, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = halves of the head dim (in fp32). x [..., Dh]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def per_token(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of `table` [U, ...] for the tokens of index [B, L] -> [B, L, ...]; a single row is
    returned as it is ([...]) and broadcasts to every token. index_select, not table[index]:
    its backward is an index_add, several times faster on CPU than indexing's index_put."""
    if table.shape[0] == 1:
        return table[0]
    return table.index_select(0, index.flatten()).unflatten(0, index.shape)


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

    def _qk(self, qk: torch.Tensor, rope) -> torch.Tensor:
        """QK-norm and RoPE of q and k together, in fp32 (the fused RMSNorm kernel needs input
        and weight of one dtype): qk [B, L, 2, H, Dh] -> same shape, fp32."""
        qk = qk.float()
        if isinstance(self.q_norm, RmsNorm):
            w = torch.stack([self.q_norm.weight, self.k_norm.weight]).float()[:, None]  # [2, 1, Dh]
            qk = F.rms_norm(qk, (self.head_dim,), eps=self.q_norm.eps) * w
        return apply_rope(qk, *rope)

    def project(self, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, L, Dh] of h [B, L, W] (q and k normalized and rotated)."""
        b, n, _ = h.shape
        qkv = self.qkv(h).view(b, n, 3, self.heads, self.head_dim)
        v = qkv[:, :, 2].transpose(1, 2)  # [B, H, L, Dh]
        q, k = self._qk(qkv[:, :, :2], rope).to(v.dtype).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v


# MLP activations. "gelu_tanh" (DiT's) is what models saved before `act` existed use; "gelu"
# (exact, erf) is the same curve within 1e-3 and several times faster on CPUs (bench/training.py)
ACTIVATIONS = {"gelu_tanh": partial(nn.GELU, approximate="tanh"), "gelu": nn.GELU}


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool,
                 act: str = "gelu_tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=ACTIVATIONS[act])
        self.mod_offset = nn.Parameter(torch.zeros(6, width))  # per-layer AdaLN-single offsets
        self.compiled: tuple | None = None  # (pre, post) compiled by DiT.compile_blocks

    def pre(self, x, mod, rope):
        """Up to attention: modulated norm, then q, k, v ([B, H, L, Dh] each); also returns the
        modulation the rest of the block uses. mod [B, L, 6, W] (or [6, W] when every token
        shares one time): the shared AdaLN-single modulation of each token, 1 already added to
        its two scale rows. modulate(x) = x * (1 + scale) + shift."""
        sh1, sc1, g1, sh2, sc2, g2 = (mod + self.mod_offset).unbind(-2)  # [B, L, W] or [W]
        q, k, v = self.attn.project(torch.addcmul(sh1, self.norm1(x), sc1), rope)
        return q, k, v, (g1, sh2, sc2, g2)

    def post(self, x, out, g1, sh2, sc2, g2):
        """After attention (out [B, H, L, Dh]): projection, gated residual, modulated MLP."""
        x = torch.addcmul(x, g1, self.attn.proj(out.transpose(1, 2).flatten(2)))  # [B, L, W]
        return torch.addcmul(x, g2, self.mlp(torch.addcmul(sh2, self.norm2(x), sc2)))

    def forward(self, x, mod, rope, mask, backend, cache, layer, commit):
        pre, post = self.compiled or (DiTBlock.pre, DiTBlock.post)
        q, k, v, rest = pre(self, x, mod, rope)
        if cache is not None:  # commit=True: keep every token of this call; an int n: its first n
            keep = x.shape[1] if commit is True else int(commit)
            k, v = cache.extend(layer, k, v, keep)  # [B, H, Lc + L, Dh]: the cache + this call
        return post(self, x, attention(q, k, v, mask, backend), *rest)  # [B, L, W]


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
        act: str = "gelu_tanh",
    ):
        super().__init__()
        # Modality ids are positions in this order (text 0, image 1, as unified/layout.py).
        # Stored as a list of [name, dim] pairs: diffusers writes config.json with sorted keys,
        # which would silently reorder a dict (and swap the projections) on reload.
        pairs = list((modalities or {"text": 16}).items()) if isinstance(modalities, dict) or \
            modalities is None else [tuple(m) for m in modalities]
        self.register_to_config(modalities=[[name, int(d)] for name, d in pairs])
        modalities = dict(pairs)
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
        if width % heads or (width // heads) % (2 * rope_axes):
            raise ValueError("width/heads must be divisible by 2 * rope_axes")
        self.modality_names = list(modalities)
        self.latent_width = max(modalities.values())
        self.in_proj = nn.ModuleDict({m: nn.Linear(d, width) for m, d in modalities.items()})
        self.out_proj = nn.ModuleDict({m: nn.Linear(width, d) for m, d in modalities.items()})
        self.modality_embed = nn.Embedding(len(modalities), width)
        self.t_embed = Mlp(256, width, width, act_layer=nn.SiLU)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # AdaLN-single
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, qk_norm, act)
                                    for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self._backend: str | None = None
        # 1 on the two scale rows (shift, scale, gate) x 2 of the modulation: x * (1 + scale)
        self.register_buffer("scale_one", torch.tensor([0.0, 1, 0, 0, 1, 0])[:, None],
                             persistent=False)
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

    def compile_blocks(self, **options) -> None:
        """torch.compile every block's pre- and post-attention regions (fusing the AdaLN,
        norm, QK-norm, RoPE, GELU and residual element-wise chains). One compiled function
        serves all layers; attention and the KV cache stay eager, so a growing cache never
        recompiles. `options` go to torch.compile (default dynamic=True)."""
        options = {"dynamic": True, **options}
        regions = (torch.compile(DiTBlock.pre, **options), torch.compile(DiTBlock.post, **options))
        for blk in self.blocks:
            blk.compiled = regions

    def new_cache(self, capacity: int = 0) -> KVCache:
        return KVCache(self.config.depth, capacity)

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
        z = z.to(h.dtype)  # a bf16 copy of the model takes fp32 latents and times (no autocast)
        for i, name in enumerate(self.modality_names):
            d = self.in_proj[name].in_features
            proj = self.in_proj[name](z[..., :d])  # [B, L, W]
            h = h + (proj if len(self.modality_names) == 1 else proj * (modality == i)[..., None])
        # AdaLN-single depends on t alone: embed and project each distinct time once (a block
        # shares one t), then spread them over the tokens once for all layers (each layer only
        # adds its offsets). Not when training on an accelerator, where unique() would wait for
        # the device: there every token is embedded.
        index = None
        if t.device.type == "cpu" or not torch.is_grad_enabled():
            t, index = t.unique(return_inverse=True)  # [U], [B, L]
        temb = self.t_embed(timestep_embedding(t, 256).to(h.dtype))  # [U or (B, L), W]
        mod = self.adaln(temb).unflatten(-1, (6, cfg.width)) + self.scale_one  # [.., 6, W]
        final = self.final_adaln(temb)  # [U or (B, L), 2W]
        if index is not None:
            mod, final = per_token(mod, index), per_token(final, index)  # [B, L, ..] or [..]
        rope = rope_tables(positions, cfg.width // cfg.heads, cfg.rope_axes, cfg.rope_theta)
        for i, blk in enumerate(self.blocks):
            h = blk(h, mod, rope, mask, self.backend, cache, i, commit)  # [B, L, W]
        shift, scale = final.chunk(2, dim=-1)  # [B, L, W] or [W]
        h = modulate(self.final_norm(h), shift, scale)  # [B, L, W]
        out = z.new_zeros(*h.shape[:2], self.latent_width, dtype=h.dtype)
        for i, name in enumerate(self.modality_names):
            v = self.out_proj[name](h)  # [B, L, d]
            if len(self.modality_names) == 1:
                return v
            v = nn.functional.pad(v, (0, self.latent_width - v.shape[-1]))
            out = torch.where((modality == i)[..., None], v, out)
        return out  # [B, L, Dmax]
