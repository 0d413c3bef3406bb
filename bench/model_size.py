"""Parameter counts and static training memory of a preset (no data, no GPU needed).

    python bench/model_size.py text-default text-300m text-1b

Static memory = fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 bytes/param
(per GPU under DDP; divided by the number of GPUs under FSDP). Activations come on top and
depend on micro-batch size and sequence length.
"""

from __future__ import annotations

import sys

import torch

from unified.config import load_preset
from unified.model import build_prior
from vaes.text_vae import TextVAE


def sizes(name: str) -> dict[str, float]:
    cfg = load_preset(name)
    v = cfg.vae
    with torch.device("meta"):
        vae = TextVAE(vocab_size=v.vocab_size, latent_dim=v.latent_dim, patch_size=v.patch_size,
                      width=v.width, enc_layers=v.enc_layers, dec_layers=v.dec_layers,
                      heads=v.heads, mlp_ratio=v.mlp_ratio, max_len=cfg.data.seq_len)
        prior = build_prior(cfg, v.latent_dim)
    n_vae = sum(p.numel() for p in vae.parameters())
    n_prior = sum(p.numel() for p in prior.parameters())
    return {"vae_M": n_vae / 1e6, "prior_M": n_prior / 1e6,
            "static_GiB": 16 * (n_vae + n_prior) / 2**30}


def main(names: list[str]) -> None:
    print(f"{'preset':<16}{'VAE (M)':>10}{'prior (M)':>12}{'static train mem (GiB)':>26}")
    for name in names:
        s = sizes(name)
        print(f"{name:<16}{s['vae_M']:>10.1f}{s['prior_M']:>12.1f}{s['static_GiB']:>26.1f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["text-tiny", "text-default"])
