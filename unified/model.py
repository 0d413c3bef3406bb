"""The Cola model: Text VAE + block-causal DiT prior, their losses, and the saved folder.

Stage 1 trains the VAE alone:  recon + beta * KL + lambda_mask * mask.
Stage 2 trains both jointly (DESIGN §3, the paper's best-scaling setting):
    L = lambda_vae * (recon + beta * KL + lambda_mask * mask) + lambda_fm * L_FM
        + lambda_ref * KL(q_phi(z0|x) || q_phi_ref(z0|x))
with the reference encoder a frozen copy of the stage-1 VAE.

A saved model is a folder: model_index.json, text_vae/ and prior/ (config.json +
safetensors each), tokenizer/ (a transformers fast tokenizer).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

from prior.dit import DiT
from unified.config import ColaConfig, LossConfig
from unified.layout import TextLayoutConfig, text_to_text_layout
from vaes.text_vae import TextVAE
from vaes.tokenizer import load_tokenizer

MODEL_INDEX = "model_index.json"


def gaussian_kl(mean, logvar, ref_mean, ref_logvar) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(ref_mean, e^ref_logvar)) summed over the last dim."""
    return 0.5 * (ref_logvar - logvar + (logvar.exp() + (mean - ref_mean).pow(2))
                  / ref_logvar.exp() - 1.0).sum(-1)


def build_vae(cfg: ColaConfig, tokenizer) -> TextVAE:
    v = cfg.vae
    return TextVAE(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   mask_token_id=tokenizer.mask_token_id, latent_dim=v.latent_dim,
                   patch_size=v.patch_size, width=v.width, enc_layers=v.enc_layers,
                   dec_layers=v.dec_layers, heads=v.heads, mlp_ratio=v.mlp_ratio,
                   max_len=cfg.data.seq_len)


def build_prior(cfg: ColaConfig, latent_dim: int) -> DiT:
    p = cfg.prior
    return DiT(modalities={"text": latent_dim}, width=p.width, depth=p.depth, heads=p.heads,
               mlp_ratio=p.mlp_ratio, attn_backend=p.attn_backend)


class ColaModel(nn.Module):
    """Text VAE + prior (+ frozen reference encoder during stage 2)."""

    def __init__(self, vae: TextVAE, prior: DiT | None, tokenizer,
                 layout: TextLayoutConfig | None = None):
        super().__init__()
        self.vae, self.prior, self.tokenizer = vae, prior, tokenizer
        self.layout_cfg = layout or TextLayoutConfig()
        self.ref_vae: TextVAE | None = None

    @property
    def block_size(self) -> int:
        return self.layout_cfg.block_size

    def freeze_reference(self) -> None:
        """Snapshot the current VAE as the frozen reference encoder q_phi_ref."""
        self.ref_vae = copy.deepcopy(self.vae).requires_grad_(False).eval()

    # ----------------------------------------------------------------- losses
    def forward(self, batch: dict, stage: int, w: LossConfig, generator=None):
        """(loss, logged terms) of a training stage; the entry point DDP wraps."""
        return (self.stage1_loss if stage == 1 else self.stage2_loss)(batch, w, generator)

    def stage1_loss(self, batch: dict, w: LossConfig, generator=None) -> tuple[torch.Tensor, dict]:
        terms = self.vae.stage1_terms(batch, mask_prob=w.mask_prob,
                                      decoder_noise=w.decoder_noise,
                                      sample=w.sample_posterior, generator=generator)
        loss = terms["recon"] + w.beta * terms["kl"] + w.lambda_mask * terms["mask"]
        return loss, {k: terms[k] for k in ("recon", "kl", "mask", "acc")}

    def stage2_loss(self, batch: dict, w: LossConfig, generator=None) -> tuple[torch.Tensor, dict]:
        if self.prior is None or self.ref_vae is None:
            raise RuntimeError("stage 2 needs a prior and a frozen reference encoder")
        vae_loss, logs = self.stage1_loss(batch, w, generator)
        ids, sample_ids, positions = batch["input_ids"], batch["sample_ids"], batch["positions"]
        # latents of the uncorrupted text: what the prior models and generation encodes
        mean, logvar = self.vae.encode(ids, sample_ids, positions)  # [B, L, d] each
        lat_s, lat_p = self.vae.latent_meta(sample_ids, positions)
        lat_valid = lat_s >= 0
        with torch.no_grad():
            ref_mean, ref_logvar = self.ref_vae.encode(ids, sample_ids, positions)
        ref_kl = gaussian_kl(mean.float(), logvar.float(), ref_mean.float(), ref_logvar.float())
        ref_kl = (ref_kl * lat_valid).sum() / lat_valid.sum().clamp_min(1)

        z = self.vae.posterior_sample(mean, logvar, generator) if w.sample_posterior else mean
        z0 = self.vae.normalize(z)
        lay = text_to_text_layout(z0, lat_s, lat_p, self.layout_cfg, generator)
        v = self.prior(lay.z, lay.t, lay.modality, lay.positions, lay.attention_mask())
        err = (v.float() - lay.target.float()).pow(2).mean(-1)  # [B, 2L]
        fm = (err * lay.loss_mask).sum() / lay.loss_mask.sum().clamp_min(1)

        loss = w.lambda_vae * vae_loss + w.lambda_fm * fm + w.lambda_ref * ref_kl
        logs.update(fm=fm.detach(), ref_kl=ref_kl.detach())
        return loss, logs

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, folder: str | Path, weights: bool = True) -> None:
        """Write the model folder; `weights=False` writes configs, tokenizer and index only
        (the skeleton of a sharded checkpoint)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in (("text_vae", self.vae), ("prior", self.prior)):
            if part is not None:
                (part.save_pretrained if weights else part.save_config)(folder / name)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        (folder / MODEL_INDEX).write_text(json.dumps(self.index(), indent=2))

    def index(self) -> dict:
        """model_index.json: which parts the folder holds and the inference layout."""
        return {"_class_name": "ColaModel", "text_vae": "TextVAE",
                "prior": "DiT" if self.prior is not None else None,
                "tokenizer": "PreTrainedTokenizerFast",
                "layout": {"block_size": self.layout_cfg.block_size}}

    @staticmethod
    def layout_from_index(index: dict) -> TextLayoutConfig:
        return TextLayoutConfig(block_size=index.get("layout", {}).get("block_size", 16))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> ColaModel:
        folder = Path(folder)
        if not (folder / MODEL_INDEX).is_file():
            raise FileNotFoundError(
                f"no Cola model at {folder}: expected {folder / MODEL_INDEX} (a folder written "
                "by `cola train` or `cola export`)")
        index = json.loads((folder / MODEL_INDEX).read_text())
        tok = load_tokenizer(folder / "tokenizer")
        vae = TextVAE.from_pretrained(folder / "text_vae", low_cpu_mem_usage=False)
        prior = DiT.from_pretrained(folder / "prior", low_cpu_mem_usage=False) if index.get("prior") else None
        layout = cls.layout_from_index(index)
        # weights may be stored in bf16 to keep the bundled model small; compute in fp32
        return cls(vae, prior, tok, layout).to(device=device, dtype=torch.float32).eval()
