"""How a run's model starts (unified/training/trainer.py Trainer): its tokenizer (from --init, an
existing tokenizer folder, or a BPE trained by rank 0), the pretrained image VAE of stage 2,
and the latent statistics measured before stage 2 (the same batches on every rank)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from unified.data.streams import DataError, text_samples
from unified.model import ColaModel
from unified.training import distributed as dist_utils
from unified.training.batches import Slicing
from vaes import image_vae as iv
from vaes.tokenizer import adopt_tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger("cola.train")


def tokenizer(tr, init):
    """The run's tokenizer: --init's; else vae.tokenizer adopted, or a BPE trained on the
    run's texts, by rank 0 (the others load its file; all stop if it fails)."""
    if init is not None:
        return load_tokenizer(Path(init) / "tokenizer")
    tok_dir = tr.out / "tokenizer"
    error = None
    if tr.dist.is_main and not (tok_dir / "tokenizer.json").is_file():
        try:  # rank 0 trains (or adopts) it; the others load its file
            if tr.cfg.vae.tokenizer:
                adopt(tr.cfg.vae.tokenizer, tok_dir)
            else:
                train_bpe(tr, tok_dir)
        except ValueError as e:  # e.g. DataError: no usable text; every rank must stop
            error = e
    failed = dist_utils.sum_across_ranks(
        torch.tensor([1.0 if error else 0.0], device=tr.device), tr.dist)
    if failed.item() > 0:
        raise error or DataError("rank 0 could not train the tokenizer (see its log)")
    return load_tokenizer(tok_dir)


def adopt(folder: str, tok_dir: Path) -> None:
    """vae.tokenizer: an existing tokenizer folder, its special tokens completed."""
    tok, added = adopt_tokenizer(folder)
    if added:
        log.info("vae.tokenizer %s: added the special tokens %s (ids %s); the Text VAE's "
                 "vocabulary follows: %d tokens", folder, added,
                 tok.convert_tokens_to_ids(added), len(tok))
    tok.save_pretrained(tok_dir)


def train_bpe(tr, tok_dir: Path) -> None:
    """A byte-level BPE on the run's prose and task texts."""
    n = tr.cfg.data.tokenizer_docs
    texts = [t for i, t in zip(range(n), text_samples(tr.train_spec, resample=False,
                                                            skips=tr.skips["text"],
                                                            same_on_all_ranks=True))
             ] if tr.train_spec else []
    if tr.tasks is not None:  # captions, instructions, questions
        texts += tr.tasks.texts(n, tr.skips["pairs"])
    log.info("training a %d-token BPE on %d documents", tr.cfg.vae.vocab_size, len(texts))
    train_tokenizer(texts, vocab_size=tr.cfg.vae.vocab_size).save_pretrained(tok_dir)


def use_pretrained_image_vae(model: ColaModel, folder: str) -> None:
    """Stage 2 with image.pretrained: that VAE replaces the stage-1 model's (the same one
    when stage 1 used it too); refused when the stage-1 model's prior reads other image
    tokens."""
    vae = iv.load_image_vae(folder)
    old = model.image_vae
    model.image_vae, model.image_vae_source = vae, Path(folder).resolve()
    prior_dim = dict(model.prior.config.modalities).get("image") if model.prior else None
    if prior_dim is not None and prior_dim != model.image_token_dim:
        raise ValueError(f"image.pretrained = {folder}: its latents make image tokens of "
                         f"{model.image_token_dim} values, but the prior of --init reads "
                         f"{prior_dim}; use the image VAE the prior was trained with")
    if old is None or old.config.latent_channels != vae.config.latent_channels or \
            list(old.config.block_out_channels) != list(vae.config.block_out_channels):
        log.info("image.pretrained = %s replaces the image VAE of --init", folder)


def measure_latent_stats(tr, model: ColaModel, n_batches: int = 8) -> None:
    """Per-channel latent statistics (text, and images if missing), measured on the same
    batches on every rank so every rank normalizes alike."""
    vae = model.vae
    stream = tr._stream(model.tokenizer, tr.tcfg.seed + 7, vae.config.patch_size,
                        Slicing(rows=tr.data.batch_size, pairs=tr.data.pair_batch_size))
    batches = [stream.cut(pos, b)[0]  # the whole global batch, every image decoded
               for pos, b in zip(range(n_batches), stream.global_batches())]
    for b in batches:  # placeholders of undecodable images are not data
        if "pairs" in b:
            keep = torch.tensor(b["pairs"]["valid"], dtype=torch.bool)
            b["pairs"]["images"] = b["pairs"]["images"][keep]
    if not vae.has_latent_stats:
        shift, scale = vae.measure_latent_stats(ColaModel._text_rows(b) for b in batches)
        vae.set_latent_stats(shift, scale)
        log.info("text latent stats: |shift| mean %.3f, scale mean %.3f",
                 shift.abs().mean().item(), scale.mean().item())
    if model.image_vae is not None and model.image_vae.config.latents_mean is None:
        mean, std = iv.measure_latent_stats(model.image_vae,
                                            (b["pairs"]["images"] for b in batches
                                             if len(b["pairs"]["images"])))
        iv.set_latent_stats(model.image_vae, mean, std)
        log.info("image latent stats: mean %s, std %s", [round(float(x), 3) for x in mean],
                 [round(float(x), 3) for x in std])
