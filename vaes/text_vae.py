"""Causal Text VAE (Cola DLM stage 1, DESIGN §3).

Encoder q_phi(z0 | x): token embedding (the [MASK] token is a row of it) -> causal transformer
-> every `patch_size` hidden states merged -> mean and clamped log-variance of a `latent_dim`
latent. Decoder p_theta(x | z0): causal transformer over latents -> logits of the `patch_size`
tokens of every latent, all positions in parallel (it never feeds sampled tokens back), so it
can decode block by block with a KV cache.

Packed rows are supported: `sample_ids` [B, L] (-1 = padding) keeps samples apart and
`positions` [B, L] restart at 0 per sample.

Latent normalization (shift, scale) is measured from data after stage 1 and stored in the
config; `normalize` maps VAE latents to the prior's space and `denormalize` maps back.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

Past = list[tuple[torch.Tensor, torch.Tensor]]


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos position features [B, L] -> [B, L, dim] (DESIGN §7: learned random
    position vectors failed to learn position on these budgets; sin-cos worked)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    args = positions.float()[..., None] * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def causal_mask(q_sample, q_pos, k_sample, k_pos) -> torch.Tensor:
    """[B, Lq, Lk]: same sample and key position <= query position (padding rows see self)."""
    m = (q_sample[:, :, None] == k_sample[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])
    m &= k_sample[:, None, :] >= 0
    return m | ~m.any(-1, keepdim=True)


# MLP activations: "gelu_tanh" is what models saved before `act` existed use; "gelu" (exact,
# erf) is the same curve within 1e-3 and several times faster on CPUs
ACTIVATIONS = {"gelu_tanh": lambda: nn.GELU(approximate="tanh"), "gelu": nn.GELU}


class CausalBlock(nn.Module):
    """Pre-norm transformer block whose attention can extend a past of cached keys/values."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str = "gelu_tanh"):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act](),
                                 nn.Linear(hidden, width))

    def forward(self, x, mask, past: tuple | None = None):
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # [B, H, Lp + L, Dh]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # [B, H, L, Dh]
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, w))
        x = x + self.mlp(self.norm2(x))
        return x, (k, v)


def _call(module: nn.Module, *args):
    return module(*args)


def _detached(module: nn.Module, *args):
    """module(*args) with its parameters detached: gradients reach the inputs only."""
    return torch.func.functional_call(
        module, {k: v.detach() for k, v in module.named_parameters()}, args)


class TextVAE(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        pad_token_id: int = 0,
        mask_token_id: int = 3,
        latent_dim: int = 16,
        patch_size: int = 1,
        width: int = 256,
        enc_layers: int = 2,
        dec_layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_len: int = 256,
        logvar_min: float = -12.0,
        logvar_max: float = 2.0,
        latent_shift: list[float] | None = None,
        latent_scale: list[float] | None = None,
        act: str = "gelu_tanh",
    ):
        super().__init__()
        if max_len % patch_size:
            raise ValueError("max_len must be a multiple of patch_size")
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
        self.tok_embed = nn.Embedding(vocab_size, width)  # includes the [MASK] row
        self.encoder = nn.ModuleList(CausalBlock(width, heads, mlp_ratio, act)
                                     for _ in range(enc_layers))
        self.enc_norm = nn.LayerNorm(width)
        self.to_moments = nn.Linear(patch_size * width, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, width)
        self.decoder = nn.ModuleList(CausalBlock(width, heads, mlp_ratio, act)
                                     for _ in range(dec_layers))
        self.dec_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_size * vocab_size)
        shift = torch.tensor(latent_shift if latent_shift is not None else [0.0] * latent_dim)
        scale = torch.tensor(latent_scale if latent_scale is not None else [1.0] * latent_dim)
        self.register_buffer("shift", shift.float(), persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # token and latent inputs must not be drowned by the unit-amplitude sin-cos positions
        nn.init.normal_(self.tok_embed.weight, std=1.0)
        nn.init.normal_(self.from_latent.weight, std=self.config.latent_dim ** -0.5)
        # start with a narrow posterior (sigma = e^-3): with sigma = 1 the tiny initial means
        # are drowned in noise, the decoder learns to ignore z and the posterior collapses
        nn.init.constant_(self.to_moments.bias[self.config.latent_dim:], -6.0)

    # ----------------------------------------------------------------- latent normalization
    @property
    def has_latent_stats(self) -> bool:
        return self.config.latent_shift is not None

    def set_latent_stats(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Store the measured per-channel shift/scale in the config (saved with the model)."""
        self.register_to_config(latent_shift=[float(x) for x in shift],
                                latent_scale=[float(x) for x in scale])
        self.shift.copy_(shift.float())
        self.scale.copy_(scale.float())

    @torch.no_grad()
    def measure_latent_stats(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of posterior samples (what the prior models) over the
        valid latents of `batches`."""
        total, sq, count = 0.0, 0.0, 0
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            mean, logvar = self.encode(batch["input_ids"], batch["sample_ids"], batch["positions"])
            lat_s, _ = self.latent_meta(batch["sample_ids"], batch["positions"])
            z = self.posterior_sample(mean, logvar).float()[lat_s >= 0]  # [N, d]
            total, sq, count = total + z.sum(0), sq + z.pow(2).sum(0), count + z.shape[0]
        if count == 0:
            raise ValueError("no latents to measure: the batches were empty")
        shift = total / count
        scale = (sq / count - shift.pow(2)).clamp_min(1e-8).sqrt()
        return shift.cpu(), scale.cpu()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale.to(z.dtype) + self.shift.to(z.dtype)

    # ----------------------------------------------------------------- encoder / decoder
    def latent_meta(self, sample_ids: torch.Tensor, positions: torch.Tensor):
        """Token-level (sample id, position) [B, L] -> latent-level [B, L / p]."""
        p = self.config.patch_size
        if p == 1:
            return sample_ids, positions
        if sample_ids.shape[1] % p or (positions[:, ::p] % p).any():
            raise ValueError(f"with patch_size {p} every sample must start at a multiple of {p}")
        return sample_ids[:, ::p], positions[:, ::p] // p

    def encode(self, input_ids, sample_ids, positions):
        """q_phi(z0 | x): mean, logvar [B, L / p, d] (logvar clamped)."""
        cfg = self.config
        h = self.tok_embed(input_ids)
        h = h + sinusoidal_positions(positions, cfg.width).to(h.dtype)  # [B, L, W]
        mask = causal_mask(sample_ids, positions, sample_ids, positions)  # [B, L, L]
        for blk in self.encoder:
            h, _ = blk(h, mask)  # [B, L, W]
        h = self.enc_norm(h).reshape(h.shape[0], -1, cfg.patch_size * cfg.width)  # [B, L/p, pW]
        mean, logvar = self.to_moments(h).chunk(2, dim=-1)  # [B, L/p, d] each
        return mean, logvar.clamp(cfg.logvar_min, cfg.logvar_max)

    def decode(self, z, lat_sample_ids, lat_positions, past: Past | None = None,
               past_sample_ids=None, past_positions=None, frozen: bool = False):
        """p_theta(x | z0): token logits [B, L, V] for latents z [B, L / p, d] (raw VAE space).

        With `past` (from an earlier call), the new latents also attend to those cached ones;
        returns (logits, new_past) where new_past covers past + these latents. `frozen`: the
        decoder's weights are detached, so a loss on the logits reaches z only.
        """
        cfg = self.config
        run = _detached if frozen else _call
        h = run(self.from_latent, z.to(self.from_latent.weight.dtype))  # (bf16 copy, fp32 z)
        h = h + sinusoidal_positions(lat_positions, cfg.width).to(h.dtype)  # [B, Lz, W]
        k_sample, k_pos = lat_sample_ids, lat_positions
        if past is not None:
            k_sample = torch.cat([past_sample_ids, lat_sample_ids], 1)
            k_pos = torch.cat([past_positions, lat_positions], 1)
        mask = causal_mask(lat_sample_ids, lat_positions, k_sample, k_pos)  # [B, Lz, Lp + Lz]
        new_past = []
        for i, blk in enumerate(self.decoder):
            h, kv = run(blk, h, mask, None if past is None else past[i])  # [B, Lz, W]
            new_past.append(kv)
        logits = run(self.head, run(self.dec_norm, h))  # [B, Lz, p * V]
        return logits.reshape(h.shape[0], -1, cfg.vocab_size), new_past  # [B, L, V]

    # ----------------------------------------------------------------- stage-1 loss
    def mask_inputs(self, input_ids, valid, prob: float, generator=None):
        """BERT-style corruption of encoder inputs: of the chosen positions 80% -> [MASK],
        10% -> random token, 10% kept. Returns (corrupted ids, chosen bool mask)."""
        shape, dev = input_ids.shape, input_ids.device
        u = torch.rand(shape, device=dev, generator=generator)
        chosen = (u < prob) & valid
        r = torch.rand(shape, device=dev, generator=generator)
        rand_tok = torch.randint(4, self.config.vocab_size, shape, device=dev, generator=generator)
        ids = torch.where(chosen & (r < 0.8), torch.full_like(input_ids, self.config.mask_token_id),
                          input_ids)
        ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_tok, ids)
        return ids, chosen

    def posterior_sample(self, mean, logvar, generator=None):
        eps = torch.randn(mean.shape, device=mean.device, generator=generator, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def flow_noise(self, z, t_max: float, generator=None):
        """Decoder noise augmentation along the flow path in the prior's normalized space:
        z_t = (1 - t) z + t eps with t ~ U(0, t_max) per sample, so the decoder tolerates the
        residual error of the prior (eval: >= 95% token accuracy at t = 0.1)."""
        if t_max <= 0:
            return z
        if self.has_latent_stats:
            m, s = self.shift.to(z.dtype), self.scale.to(z.dtype)
        else:  # stage 1: stats are not measured yet, use this batch's (no gradient)
            flat = z.detach().reshape(-1, z.shape[-1])
            m, s = flat.mean(0), flat.std(0).clamp_min(1e-4)
        t = torch.rand(z.shape[0], 1, 1, device=z.device, generator=generator) * t_max
        eps = torch.randn(z.shape, device=z.device, generator=generator, dtype=z.dtype)
        return (1 - t) * z + t * (m + s * eps)

    @staticmethod
    def kl_standard_normal(mean, logvar):
        """KL(q || N(0, I)) summed over latent dims: [B, L, d] -> [B, L]."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)

    def stage1_terms(self, batch: dict, *, mask_prob: float, decoder_noise: float,
                     sample: bool = True, generator=None) -> dict:
        """Per-token quantities for the stage-1 loss (the caller weights and sums them).

        Returns dict with mean/logvar/z (posterior sample) [B, L/p, d], recon and mask CE
        (scalars, mean over their tokens), kl (mean per latent), token accuracy, and "counts":
        how many tokens / latents each of the four means is over.
        """
        ids, sample_ids, positions = batch["input_ids"], batch["sample_ids"], batch["positions"]
        valid = sample_ids >= 0
        corrupted, chosen = self.mask_inputs(ids, valid, mask_prob, generator)
        mean, logvar = self.encode(corrupted, sample_ids, positions)
        z = self.posterior_sample(mean, logvar, generator) if sample else mean
        lat_s, lat_p = self.latent_meta(sample_ids, positions)
        logits, _ = self.decode(self.flow_noise(z, decoder_noise, generator), lat_s, lat_p)
        ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none")
        ce = ce.view_as(ids)
        plain = valid & ~chosen
        recon = (ce * plain).sum() / plain.sum().clamp_min(1)
        masked = (ce * chosen).sum() / chosen.sum().clamp_min(1)
        lat_valid = lat_s >= 0
        kl = (self.kl_standard_normal(mean.float(), logvar.float()) * lat_valid).sum()
        kl = kl / lat_valid.sum().clamp_min(1)
        acc = ((logits.argmax(-1) == ids) & valid).sum() / valid.sum().clamp_min(1)
        return {"mean": mean, "logvar": logvar, "z": z, "recon": recon, "mask": masked,
                "kl": kl, "acc": acc.detach(),
                # items each mean is over (a sum over several batches is mean x count)
                "counts": {"recon": plain.sum(), "mask": chosen.sum(), "kl": lat_valid.sum(),
                           "acc": valid.sum()}}
