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
from dataclasses import dataclass
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


def time_group(index: torch.Tensor, sizes: tuple[int, ...] = (16, 8, 4, 2)) -> int:
    """The largest G in `sizes` such that every aligned run of G tokens of index [B, L] shares
    one time (a Cola block shares its t), else 1. Modulation is then spread per group of G
    tokens, not per token: G times less AdaLN traffic forward and backward."""
    for g in sizes:
        if index.shape[1] % g == 0:
            runs = index.unflatten(1, (-1, g))  # [B, L/G, G]
            if bool((runs == runs[..., :1]).all()):
                return g
    return 1


def per_token(table: torch.Tensor, index: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Rows of `table` [U, ...] for the tokens of index [B, L] -> [B, L / group, ...], one row
    per aligned group of `group` tokens that share a time (`time_group`); a single row is
    returned as it is ([...]) and broadcasts to every token. index_select, not table[index]:
    its backward is an index_add, several times faster on CPU than indexing's index_put."""
    if table.shape[0] == 1:
        return table[0]
    index = index[:, ::group]  # [B, L / group]
    return table.index_select(0, index.flatten()).unflatten(0, index.shape)


def embed_distinct_times(t: torch.Tensor) -> bool:
    """Embed each distinct time once (then spread it over the tokens), not every token: on CPU
    and at inference. Not when training on an accelerator, where t.unique() would wait for it."""
    return t.device.type == "cpu" or not torch.is_grad_enabled()


@dataclass
class TimeIndex:
    """Which row of a table of distinct times (AdaLN-single) each token takes: index [B, L]
    into the table's rows, spread one row per aligned group of `group` tokens (`time_group`).
    index None: the tables already hold one row per token."""

    index: torch.Tensor | None = None
    group: int = 1

    def spread(self, table: torch.Tensor) -> torch.Tensor:
        """table [U, ...] -> [B, L / group, ...] (or [...] when U == 1; table when per token)."""
        return table if self.index is None else per_token(table, self.index, self.group)


def _grouped(rows: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether rows [B, L / G, W] hold one row per group of G > 1 tokens of x [B, L, W]."""
    return rows.dim() == 3 and rows.shape[1] != x.shape[1]


def _groups(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, L, W] -> [B, n, L / n, W] (a view)."""
    return x.unflatten(1, (n, -1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * scale + shift (the caller's scale already holds AdaLN's 1 + scale) for x [B, L, W]
    and shift/scale [B, L / G, W] (one row per group of G tokens, `per_token`) or [W]."""
    if not _grouped(shift, x):
        return torch.addcmul(shift, x, scale)
    n = shift.shape[1]
    return torch.addcmul(shift[:, :, None], _groups(x, n), scale[:, :, None]).flatten(1, 2)


def gated(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + gate * update, with gate [B, L / G, W] or [W] as in `modulate`."""
    if not _grouped(gate, x):
        return torch.addcmul(x, gate, update)
    n = gate.shape[1]
    return torch.addcmul(_groups(x, n), gate[:, :, None], _groups(update, n)).flatten(1, 2)


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

    def pre(self, x, mod1, rope):
        """Up to attention: modulated norm, then q, k, v ([B, H, L, Dh] each). mod1 [B, L / G, 2, W]
        (or [2, W] when every token shares one time): shift and 1 + scale of each group of G
        tokens that share a time (`TimeIndex`)."""
        shift, scale = mod1.unbind(-2)  # [B, L / G, W] or [W]
        return self.attn.project(modulate(self.norm1(x), shift, scale), rope)

    def post(self, x, out, mod2):
        """After attention (out [B, H, L, Dh]): projection, gated residual, modulated MLP.
        mod2 [B, L / G, 4, W] or [4, W]: attention gate, MLP shift, 1 + scale and gate."""
        g1, sh2, sc2, g2 = mod2.unbind(-2)  # [B, L / G, W] or [W]
        x = gated(x, g1, self.attn.proj(out.transpose(1, 2).flatten(2)))  # [B, L, W]
        return gated(x, g2, self.mlp(modulate(self.norm2(x), sh2, sc2)))  # [B, L, W]

    def forward(self, x, mod, times, rope, mask, backend, cache, layer, commit):
        """mod [U, 6, W]: the shared AdaLN-single modulation of each distinct time (1 already
        added to its two scale rows), or [B, L, 6, W] per token when times.index is None.
        This layer adds its offsets to the small table, then spreads the pre- and the
        post-attention rows over the tokens separately: each compiled region then reads only
        its own rows, and their gradients go straight back to the table (index_add) instead
        of being summed over the layers token by token."""
        mod = mod + self.mod_offset  # [U, 6, W] or [B, L, 6, W]
        pre, post = self.compiled or (DiTBlock.pre, DiTBlock.post)
        q, k, v = pre(self, x, times.spread(mod[..., :2, :]), rope)
        if cache is not None:  # commit=True: keep every token of this call; an int n: its first n
            keep = x.shape[1] if commit is True else int(commit)
            k, v = cache.extend(layer, k, v, keep)  # [B, H, Lc + L, Dh]: the cache + this call
        out = attention(q, k, v, mask, backend)  # [B, H, L, Dh]
        return post(self, x, out, times.spread(mod[..., 2:, :]))  # [B, L, W]


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
        # shares one t); each layer adds its offsets to that small table and spreads it over the
        # tokens (DiTBlock.forward). Training on an accelerator embeds every token instead.
        times = TimeIndex()
        if embed_distinct_times(t):
            t, index = t.unique(return_inverse=True)  # [U], [B, L]
            times = TimeIndex(index, time_group(index))  # one row per G tokens sharing a time
        temb = self.t_embed(timestep_embedding(t, 256).to(h.dtype))  # [U or (B, L), W]
        mod = self.adaln(temb).unflatten(-1, (6, cfg.width)) + self.scale_one  # [.., 6, W]
        final = times.spread(self.final_adaln(temb))  # [B, L / G, 2W] or [2W]
        rope = rope_tables(positions, cfg.width // cfg.heads, cfg.rope_axes, cfg.rope_theta)
        for i, blk in enumerate(self.blocks):
            h = blk(h, mod, times, rope, mask, self.backend, cache, i, commit)  # [B, L, W]
        shift, scale = final.chunk(2, dim=-1)  # [B, L / G, W] or [W]
        h = modulate(self.final_norm(h), shift, 1 + scale)  # [B, L, W]
        out = z.new_zeros(*h.shape[:2], self.latent_width, dtype=h.dtype)
        for i, name in enumerate(self.modality_names):
            v = self.out_proj[name](h)  # [B, L, d]
            if len(self.modality_names) == 1:
                return v
            v = nn.functional.pad(v, (0, self.latent_width - v.shape[-1]))
            out = torch.where((modality == i)[..., None], v, out)
        return out  # [B, L, Dmax]
