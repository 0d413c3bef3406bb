"""Image VAE: a diffusers `AutoencoderKL`, its latent normalization, and patchify for the prior.

Any diffusers-format VAE folder loads with `load_image_vae(folder)`; `small_image_vae()` builds
the project's own small one (trained from scratch, no downloaded weights).

Latent normalization lives in the VAE's own config, so it travels with the weights:
- per channel: `latents_mean` / `latents_std` (measured from data by `measure_latent_stats`);
- otherwise the scalar diffusers convention `(z - shift_factor) * scaling_factor`.
`normalize` maps VAE latents to the prior's space (about zero mean, unit variance) and
`denormalize` maps back before decoding.

Patchify: latents [B, C, H, W] -> tokens [B, (H/p)(W/p), C p p] in row-major order, with 2-D
(row, col) positions for the prior's RoPE; each image is one bidirectional block (DESIGN §3).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from vaes.weights import load_part


def small_image_vae(latent_channels: int = 4, widths: tuple[int, ...] = (32, 64, 64),
                    sample_size: int = 32) -> AutoencoderKL:
    """A small AutoencoderKL for 32x32 images: 2^(len(widths)-1) downsampling (8x8 latents)."""
    n = len(widths)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=widths, layers_per_block=1, norm_num_groups=min(32, widths[0]),
        sample_size=sample_size, scaling_factor=1.0, shift_factor=0.0,
        mid_block_add_attention=False)


REFERENCE = "weights.json"  # a folder whose weights live in another folder
STORED = ("latents_mean", "latents_std", "scaling_factor", "shift_factor")  # kept per folder
SAME = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
        "down_block_types", "up_block_types", "layers_per_block")


def load_image_vae(folder: str | Path) -> AutoencoderKL:
    """A diffusers AutoencoderKL folder, or a folder written by `save_reference` (its config,
    the weights read from the folder it refers to); config.json + safetensors only
    (vaes/weights.py)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no diffusers VAE at {folder}: expected {folder / 'config.json'}")
    source = reference_of(folder)
    if source is None:
        return load_part(AutoencoderKL, folder)
    vae = load_part(AutoencoderKL, source)
    stored = AutoencoderKL.load_config(folder)
    for key in SAME:
        if key in stored and list(_seq(stored[key])) != list(_seq(vae.config[key])):
            raise ValueError(f"{folder} refers to the image VAE in {source}, whose {key} is "
                             f"{vae.config[key]}, not {stored[key]}: that folder was replaced")
    vae.register_to_config(**{k: stored.get(k) for k in STORED if k in stored})
    return vae


def _seq(v):
    return v if isinstance(v, (list, tuple)) else [v]


def reference_of(folder: str | Path) -> Path | None:
    """The folder holding the weights of a `save_reference` folder (checked: every weight
    file still there with its size), or None for an ordinary VAE folder."""
    ref_file = Path(folder) / REFERENCE
    if not ref_file.is_file():
        return None
    ref = json.loads(ref_file.read_text())
    source = Path(ref["folder"])
    for name, size in ref["files"].items():
        path = source / name
        if not path.is_file() or path.stat().st_size != size:
            raise FileNotFoundError(
                f"{folder} refers to the image VAE weights {path} ({size} bytes), which are "
                f"missing or changed: restore that folder (the run's image.pretrained), or "
                f"export the model while it is there")
    return source


def save_reference(vae: AutoencoderKL, folder: str | Path, source: str | Path) -> None:
    """Write `vae`'s config (with its latent statistics) and a reference to its weights in
    the diffusers folder `source` (which must hold exactly these weights: a frozen pretrained
    VAE) instead of a copy of them."""
    folder, source = Path(folder), Path(source).resolve()
    files = {f.name: f.stat().st_size for f in sorted(source.glob("*.safetensors"))}
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {source} to refer to")
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_config(folder)
    (folder / REFERENCE).write_text(json.dumps({"folder": str(source), "files": files},
                                               indent=2))


def _stats(vae: AutoencoderKL, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) broadcastable to [B, C, H, W]: z_norm = (z - shift) / scale."""
    c = vae.config
    if c.latents_mean is not None and c.latents_std is not None:
        mean = torch.tensor(c.latents_mean, device=like.device, dtype=like.dtype)
        std = torch.tensor(c.latents_std, device=like.device, dtype=like.dtype)
        return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    shift = c.shift_factor or 0.0
    return (torch.tensor(shift, device=like.device, dtype=like.dtype),
            torch.tensor(1.0 / c.scaling_factor, device=like.device, dtype=like.dtype))


def normalize(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    shift, scale = _stats(vae, z)
    return (z - shift) / scale


def denormalize(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    shift, scale = _stats(vae, z)
    return z * scale + shift


def encode(vae: AutoencoderKL, images: torch.Tensor, sample: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] [B, 3, H, W] -> normalized latents [B, C, h, w] (mean or a sample)."""
    dist = vae.encode(images).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return normalize(vae, z)


def decode(vae: AutoencoderKL, z_norm: torch.Tensor) -> torch.Tensor:
    """Normalized latents -> images in [-1, 1] (clamped)."""
    return vae.decode(denormalize(vae, z_norm)).sample.clamp(-1, 1)


@torch.no_grad()
def measure_latent_stats(vae: AutoencoderKL, batches: Iterable[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean / std of posterior samples over image batches in [-1, 1]."""
    total = sq = None
    count = 0
    for images in batches:
        z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample().float()
        z = z.transpose(0, 1).flatten(1)  # [C, N]
        total = z.sum(1) if total is None else total + z.sum(1)
        sq = z.pow(2).sum(1) if sq is None else sq + z.pow(2).sum(1)
        count += z.shape[1]
    if not count:
        raise ValueError("no images to measure latent statistics on")
    mean = total / count
    return mean.cpu(), (sq / count - mean.pow(2)).clamp_min(1e-8).sqrt().cpu()


def set_latent_stats(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Store per-channel statistics in the VAE's config (saved with save_pretrained)."""
    vae.register_to_config(latents_mean=[float(x) for x in mean],
                           latents_std=[float(x) for x in std])


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float = 1e-4,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Training loss of the small VAE from scratch: L1 + MSE reconstruction + kl_weight * KL."""
    dist = vae.encode(images).latent_dist
    recon = vae.decode(dist.sample(generator)).sample
    l1 = (recon - images).abs().mean()
    mse = F.mse_loss(recon, images)
    kl = dist.kl().mean() / images[0].numel()
    return l1 + mse + kl_weight * kl, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1], per image [B]."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p] (row-major patches)."""
    b, c, h, w = z.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch size {p}")
    z = z.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """Inverse of patchify: [B, (h/p)(w/p), C p p] -> [B, C, h, w]."""
    b, n, d = tokens.shape
    c = d // (p * p)
    z = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c, h, w)


def grid_positions(rows: int, cols: int, device=None) -> torch.Tensor:
    """2-D (row, col) positions of patch tokens in patchify order: [rows * cols, 2]."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.stack([r, c], dim=-1)
