"""Image side: text-to-image latency per image, and image VAE encode / decode throughput.

    python -m bench.image                       # shapes-default size, random weights
    python -m bench.image --checkpoint demo/checkpoint   # a trained unified model instead

Run it as a module from the checkout (`python -m bench...`). All figures come from this run:
- text-to-image (tasks.text_to_image.generate): caption prompt -> one bidirectional block of
  16 image tokens integrated by the prior (ImageGenerationConfig: 16 Euler steps, CFG 4, the
  two branches fused in one call, the caption's K/V cached) -> the image VAE's decoder.
  Seconds per image at batch 1 and batch 16, with and without the KV cache; the ratio is the
  batching gain (latency at batch 1 / per-image time at batch 16).
- the image VAE (vaes/image_vae.small_image_vae, widths (32, 64, 64), 32x32 -> 8x8x4):
  images/s through encode (posterior mean) and decode at batch 64, fp32 and bf16 autocast;
  the ratio is bf16 / fp32.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch

from bench.timing import median_time
from tasks import text_to_image
from unified.apps.cli import DEFAULT_CHECKPOINT
from unified.config import load_preset
from unified.generate import ImageGenerationConfig
from unified.layout import TimeConfig
from unified.model import ColaModel, build_image_vae, build_prior, build_vae
from vaes import image_vae as iv
from vaes.tokenizer import load_tokenizer

PROMPTS = ["a large red circle at the top left", "a small blue square at the center",
           "two objects: a small green cross at the top right and a large yellow triangle at "
           "the bottom left", "a large magenta triangle at the bottom center"]


def random_unified(preset: str = "shapes-default") -> ColaModel:
    """A unified model of the preset's size with random weights (moved off AdaLN-zero)."""
    torch.manual_seed(0)
    cfg = load_preset(preset)
    tok = load_tokenizer(DEFAULT_CHECKPOINT / "tokenizer")
    vae = build_vae(cfg, tok)
    vae.set_latent_stats(torch.zeros(cfg.vae.latent_dim), torch.ones(cfg.vae.latent_dim))
    image_vae = build_image_vae(cfg)
    iv.set_latent_stats(image_vae, torch.zeros(cfg.image.latent_channels),
                        torch.ones(cfg.image.latent_channels))
    model = ColaModel(vae, None, tok, cfg.layout, image_vae, cfg.image.patch_size,
                      TimeConfig(cfg.image.time_loc, cfg.image.time_scale), cfg.image.size)
    model.prior = build_prior(cfg, cfg.vae.latent_dim, model.image_token_dim)
    with torch.no_grad():
        for p in model.prior.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained unified model folder (default: random weights)")
    ap.add_argument("--preset", default="shapes-default")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    model = ColaModel.from_pretrained(args.checkpoint) if args.checkpoint else \
        random_unified(args.preset)
    if model.image_vae is None:
        raise SystemExit(f"{args.checkpoint} has no image side")
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    gen = ImageGenerationConfig(steps=args.steps, guidance=args.guidance)
    n_prior = sum(p.numel() for p in model.prior.parameters())
    weights = f"trained {args.checkpoint}" if args.checkpoint else "random weights"
    print(f"text-to-image: prior {n_prior / 1e6:.1f}M, {model.image_grid().shape[0]} image "
          f"tokens, {args.steps} steps, CFG {args.guidance}, {args.dtype}, "
          f"{torch.get_num_threads()} threads ({weights})")
    print(f"{'batch':>6}{'s/image (cache)':>17}{'s/image (no cache)':>20}{'images/s':>10}")
    per_image = {}
    for b in args.batch:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        res = []
        for cache in (True, False):
            def run(cache=cache, prompts=prompts):
                with torch.no_grad(), amp:
                    out = text_to_image.generate(model, prompts, gen, use_cache=cache)
                assert out.images.shape[0] == len(prompts)
            res.append(median_time(run, min_runs=3) / b)
        per_image[b] = res[0]
        print(f"{b:>6}{res[0]:>17.4f}{res[1]:>20.4f}{1 / res[0]:>10.1f}", flush=True)
    if len(per_image) > 1:
        lo, hi = min(per_image), max(per_image)
        print(f"batching gain (s/image at batch {lo} / at batch {hi}): "
              f"{per_image[lo] / per_image[hi]:.2f}x")

    vae = model.image_vae.eval()
    size = model.image_size
    images = torch.rand(64, 3, size, size) * 2 - 1
    print(f"\nimage VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, "
          f"{size}x{size} -> {model.image_latent_size}x{model.image_latent_size}x"
          f"{vae.config.latent_channels}, batch 64")
    print(f"{'precision':>10}{'encode img/s':>14}{'decode img/s':>14}")
    rates = {}
    for prec in ("fp32", "bf16"):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else nullcontext()
        with torch.no_grad(), ctx:
            z = iv.encode(vae, images)
            enc = 64 / median_time(lambda ctx=ctx: iv.encode(vae, images), min_runs=3)
            dec = 64 / median_time(lambda z=z: iv.decode(vae, z), min_runs=3)
        rates[prec] = (enc, dec)
        print(f"{prec:>10}{enc:>14.0f}{dec:>14.0f}", flush=True)
    print(f"bf16 / fp32: encode {rates['bf16'][0] / rates['fp32'][0]:.2f}x, "
          f"decode {rates['bf16'][1] / rates['fp32'][1]:.2f}x")


if __name__ == "__main__":
    main()
