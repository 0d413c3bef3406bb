"""The Cola model: modality VAEs + one block-causal DiT prior, their losses, the saved folder.

Stage 1 trains the VAEs alone: the Text VAE (recon + beta * KL + lambda_mask * mask) on prose
and on the texts of image-text samples, and, when the model has one to train, the image VAE
(reconstruction + KL, vaes/image_vae.py).
Stage 2 trains the Text VAE and the prior jointly (DESIGN §3, the paper's best-scaling setting):
    L = lambda_vae * (recon + beta * KL + lambda_mask * mask) + lambda_fm * L_FM
        + lambda_ref * KL(q_phi(z0|x) || q_phi_ref(z0|x))
with the reference encoder a frozen copy of the stage-1 Text VAE. L_FM is the flow loss of
every task in the batch (text-to-text on packed prose rows; image-to-text and text-to-image on
layouts their tasks describe), averaged with `loss.task_weights`. The image VAE is frozen.

A saved model is a folder in the diffusers pipeline layout: model_index.json (which part is
which class, plus the inference layout: block size, image patch size), text_vae/, prior/,
image_vae/ (config.json + safetensors each) and tokenizer/ (a transformers fast tokenizer).
`UnifiedPipeline` (unified/apps/pipeline.py) loads the same folder.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from prior.dit import DiT
from unified.config import ColaConfig, LossConfig
from unified.layout import (
    MODALITY_IMAGE,
    MODALITY_TEXT,
    TextLayoutConfig,
    TimeConfig,
    build_layout,
    place,
    text_to_text_layout,
)
from unified.losses import Terms, from_mean
from unified.sampling import GenerationDefaults
from vaes import image_vae as iv
from vaes.text_vae import TextVAE
from vaes.tokenizer import load_tokenizer
from vaes.weights import ModelFileError, check_folder, load_part, read_json_object

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "UnifiedPipeline"
# model_index.json entries: part name -> (library, class). Only these classes are ever loaded.
PARTS = {
    "text_vae": ("vaes.text_vae", "TextVAE"),
    "prior": ("prior.dit", "DiT"),
    "image_vae": ("diffusers", "AutoencoderKL"),
    "tokenizer": ("transformers", "PreTrainedTokenizerFast"),
}


def default_device() -> torch.device:
    """Where a model runs when nobody says: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
                   max_len=cfg.data.seq_len, act=v.act)


def build_image_vae(cfg: ColaConfig):
    """The image VAE of a preset: a local diffusers folder, or the small one from scratch."""
    im = cfg.image
    if im.pretrained:
        return iv.load_image_vae(im.pretrained)
    return iv.small_image_vae(latent_channels=im.latent_channels, widths=tuple(im.widths),
                              sample_size=im.size)


def build_prior(cfg: ColaConfig, latent_dim: int, image_token_dim: int | None = None) -> DiT:
    p = cfg.prior
    modalities = {"text": latent_dim}
    if image_token_dim is not None:
        modalities["image"] = image_token_dim
    return DiT(modalities=modalities, width=p.width, depth=p.depth, heads=p.heads,
               mlp_ratio=p.mlp_ratio, attn_backend=p.attn_backend, act=p.act,
               rope_axes=2 if image_token_dim is not None else 1)


def read_index(folder: Path) -> dict:
    """model_index.json, checked: each part (library, class) is the one of PARTS or absent
    (the text VAE is required), the layout numbers are numbers. ModelFileError naming the
    file otherwise."""
    path = Path(folder) / MODEL_INDEX
    raw = read_json_object(path)
    out: dict = {}
    for name, expected in PARTS.items():
        entry = raw.get(name)
        if entry is None or entry == [None, None]:
            if name in ("text_vae", "tokenizer"):
                raise ModelFileError(f"{path}: no {name} entry (expected {list(expected)})")
            out[name] = None
        elif not isinstance(entry, list) or entry != list(expected):
            raise ModelFileError(f"{path}: {name} must be {list(expected)}, got {entry!r}")
        else:
            out[name] = entry

    def number(key, default, kind, lo):
        val = raw.get(key, default)
        if isinstance(val, bool) or not isinstance(val, kind) or not val >= lo:
            raise ModelFileError(f"{path}: {key} must be a {kind.__name__} >= {lo}, got {val!r}")
        return val

    out["block_size"] = number("block_size", raw.get("layout", {}).get("block_size", 16)
                               if isinstance(raw.get("layout"), dict) else 16, int, 1)
    out["image_patch_size"] = number("image_patch_size", 2, int, 1)
    out["image_size"] = number("image_size", 32, int, 1)
    t = raw.get("image_time", [1.0, 1.0])
    if not (isinstance(t, list) and len(t) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in t)):
        raise ModelFileError(f"{path}: image_time must be [loc, scale], got {t!r}")
    out["image_time"] = [float(x) for x in t]
    try:  # the generation defaults the model was saved with (absent in older folders)
        out["generation"] = GenerationDefaults.from_json(raw.get("generation"))
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
    return out


class ColaModel(nn.Module):
    """Text VAE + prior (+ image VAE) (+ frozen reference encoder during stage 2)."""

    def __init__(self, vae: TextVAE, prior: DiT | None, tokenizer,
                 layout: TextLayoutConfig | None = None, image_vae=None,
                 image_patch_size: int = 2, image_time: TimeConfig | None = None,
                 image_size: int = 32):
        super().__init__()
        self.vae, self.prior, self.tokenizer = vae, prior, tokenizer
        self.image_vae = image_vae
        self.layout_cfg = layout or TextLayoutConfig()
        self.image_patch_size, self.image_size = image_patch_size, image_size
        self.image_time = image_time or TimeConfig()
        # the knob defaults the CLI, pipeline, demo and server start from (model_index.json)
        self.generation = GenerationDefaults()
        self.ref_vae: TextVAE | None = None
        self.image_vae_source: Path | None = None  # its pretrained folder, if loaded from one

    @property
    def block_size(self) -> int:
        return self.layout_cfg.block_size

    @property
    def times(self) -> dict[int, TimeConfig]:
        return {MODALITY_TEXT: self.layout_cfg.time, MODALITY_IMAGE: self.image_time}

    @property
    def image_vae_trainable(self) -> bool:
        return self.image_vae is not None and next(self.image_vae.parameters()).requires_grad

    def with_prior(self, prior: DiT) -> ColaModel:
        """The same model with another prior (e.g. its EMA), sharing every other part."""
        model = ColaModel(self.vae, prior, self.tokenizer, self.layout_cfg, self.image_vae,
                          self.image_patch_size, self.image_time, self.image_size)
        model.image_vae_source = self.image_vae_source
        model.generation = self.generation
        return model

    def freeze_reference(self) -> None:
        """Snapshot the current Text VAE as the frozen reference encoder q_phi_ref."""
        self.ref_vae = copy.deepcopy(self.vae).requires_grad_(False).eval()

    # ----------------------------------------------------------------- latents in and out
    def encode_texts(self, ids: list[list[int]]) -> torch.Tensor:
        """Normalized posterior means [B, Smax, d] of token id lists (right-padded, each its own
        sample starting at position 0)."""
        dev = self.vae.device
        b, smax = len(ids), max(map(len, ids))
        input_ids = torch.full((b, smax), self.tokenizer.pad_token_id, dtype=torch.long, device=dev)
        sample = torch.full((b, smax), -1, dtype=torch.long, device=dev)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, device=dev)
            sample[i, : len(row)] = 0
        positions = torch.arange(smax, device=dev).expand(b, smax)
        mean, _ = self.vae.encode(input_ids, sample, positions)
        return self.vae.normalize(mean)

    def prior_in(self, z: torch.Tensor) -> torch.Tensor:
        """Zero-pad latents [..., d] to the prior's widest modality."""
        return F.pad(z, (0, self.prior.latent_width - z.shape[-1]))

    @staticmethod
    def prior_out(v: torch.Tensor, d: int) -> torch.Tensor:
        return v[..., :d]

    @property
    def image_latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.image_vae.config.block_out_channels) - 1)

    @property
    def image_token_dim(self) -> int:
        return self.image_vae.config.latent_channels * self.image_patch_size ** 2

    @property
    def image_factor(self) -> int:
        """Pixels per image token a side: the image VAE's downsampling x the patch size (an
        image's height and width must be multiples of it)."""
        return 2 ** (len(self.image_vae.config.block_out_channels) - 1) * self.image_patch_size

    def image_tokens_shape(self, height: int | None = None, width: int | None = None
                           ) -> tuple[int, int]:
        """(rows, cols) of the token grid of a height x width image (default: the training
        size, square); ValueError when a side is not a positive multiple of image_factor."""
        f = self.image_factor
        sides = (self.image_size if height is None else height,
                 self.image_size if width is None else width)
        for name, v in zip(("height", "width"), sides):
            if v < 1 or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} pixels, got {v}")
        return sides[0] // f, sides[1] // f

    def image_grid(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """(row, col) of the image tokens in patchify order [n, 2] of a height x width image
        (default: the training size)."""
        return iv.grid_positions(*self.image_tokens_shape(height, width))

    def encode_images(self, images: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> prior-space tokens [B, n, C p p]."""
        z = iv.encode(self.image_vae, images.to(self.image_vae.dtype), sample, generator)
        return iv.patchify(z.float(), self.image_patch_size)

    def decode_image_tokens(self, tokens: torch.Tensor, height: int | None = None,
                            width: int | None = None) -> torch.Tensor:
        """Prior-space tokens [B, n, C p p] -> images [B, 3, H, W] in [-1, 1] (default: the
        training size)."""
        rows, cols = self.image_tokens_shape(height, width)
        p = self.image_patch_size
        z = iv.unpatchify(tokens, p, rows * p, cols * p)
        return iv.decode(self.image_vae, z.to(self.image_vae.dtype)).float()

    # ----------------------------------------------------------------- losses
    def forward(self, batch: dict, stage: int, w: LossConfig, generator=None) -> Terms:
        """Loss terms of a training stage as (sum, count) (unified/losses.py; `combine` turns
        their means into the loss); the entry point DDP wraps. `batch` holds "text" (packed
        prose rows) and/or "pairs" (collated task samples, unified/data/streams.py), and optionally
        "rng": {"step": seed, "rows": (offset, total)}, which makes the prose layout draw
        what the whole global batch of `total` rows would and keep rows offset.., and the
        pairs' "seeds" give each task sample its own random stream; a slice of a global
        batch then draws the same flow noise and times as one process would."""
        return (self.stage1_loss if stage == 1 else self.stage2_loss)(batch, w, generator)

    @staticmethod
    def term_names(stage: int, tasks: list[str], prose: bool, image_trainable: bool) -> list[str]:
        """Every term a training forward may return (its present ones have positive counts),
        so that every rank reduces the same terms in the same order."""
        names = ["recon", "kl", "mask", "acc"]
        if stage == 1:
            return names + (["image", "image_l1", "image_mse", "image_kl"] if image_trainable
                            and tasks else [])
        return names + ["ref_kl"] + (["fm_text_to_text", "x0_ce"] if prose else []) + \
            [f"fm_{t}" for t in tasks]

    @staticmethod
    def combine(means: dict[str, torch.Tensor], stage: int, w: LossConfig
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logged values) from the means of the present terms; linear in the means.
        Stage 1: recon + beta KL + lambda_mask mask (+ the image VAE's loss). Stage 2:
        lambda_vae (that) + lambda_fm L_FM + lambda_ref KL to the reference encoder, L_FM the
        `loss.task_weights` average of the flow losses of the tasks present."""
        zero = next(iter(means.values())) * 0 if means else torch.zeros(())
        get = lambda k: means.get(k, zero)  # noqa: E731
        loss = get("recon") + w.beta * get("kl") + w.lambda_mask * get("mask")
        logs = {k: v.detach() for k, v in means.items() if k != "image"}
        if stage == 1:
            return loss + get("image"), logs
        fms = {k[3:]: v for k, v in means.items() if k.startswith("fm_")}
        weights = {k: w.task_weights.get(k, 1.0) for k in fms}
        fm = sum((weights[k] * v for k, v in fms.items()), zero) / max(sum(weights.values()),
                                                                      1e-8)
        logs["fm"] = fm.detach()
        return (w.lambda_vae * loss + w.lambda_fm * fm + w.lambda_ref * get("ref_kl")
                + w.lambda_x0_ce * get("x0_ce"), logs)

    @staticmethod
    def _text_rows(batch: dict) -> dict | None:
        """Prose rows and the pairs' packed text pieces, concatenated (one VAE pass)."""
        parts = [p for p in (batch.get("text"), (batch.get("pairs") or {}).get("pieces")) if p]
        if not parts:
            return None
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _vae_terms(self, rows: dict | None, w: LossConfig, generator) -> Terms:
        if rows is None:
            return {}
        terms = self.vae.stage1_terms(rows, mask_prob=w.mask_prob, decoder_noise=w.decoder_noise,
                                      sample=w.sample_posterior, generator=generator)
        return {k: from_mean(terms[k], terms["counts"][k]) for k in ("recon", "kl", "mask", "acc")}

    def stage1_loss(self, batch: dict, w: LossConfig, generator=None) -> Terms:
        terms = self._vae_terms(self._text_rows(batch), w, generator)
        pairs = batch.get("pairs")
        if pairs and self.image_vae is not None and self.image_vae_trainable:
            images, valid = pairs["images"], pairs.get("valid")
            n = images.shape[0] if valid is None else sum(map(bool, valid))
            if n < images.shape[0]:  # placeholders of undecodable images carry no loss
                keep = torch.tensor([bool(v) for v in valid], device=images.device)
                images = images[keep] if n else images[:1]  # n = 0: still run it, weight 0
            img_loss, img_logs = iv.vae_loss(self.image_vae, images,
                                             kl_weight=w.image_kl_weight, generator=generator)
            terms["image"] = from_mean(img_loss, n)  # a mean over the batch's images
            terms.update({f"image_{k}": from_mean(v, n) for k, v in img_logs.items()})
        return terms

    def stage2_loss(self, batch: dict, w: LossConfig, generator=None) -> Terms:
        if self.prior is None or self.ref_vae is None:
            raise RuntimeError("stage 2 needs a prior and a frozen reference encoder")
        rows = self._text_rows(batch)
        terms = self._vae_terms(rows, w, generator)
        ids, sample_ids, positions = rows["input_ids"], rows["sample_ids"], rows["positions"]
        # latents of the uncorrupted text: what the prior models and generation encodes
        mean, logvar = self.vae.encode(ids, sample_ids, positions)  # [R, L, d] each
        lat_s, lat_p = self.vae.latent_meta(sample_ids, positions)
        lat_valid = lat_s >= 0
        with torch.no_grad():
            ref_mean, ref_logvar = self.ref_vae.encode(ids, sample_ids, positions)
        ref_kl = gaussian_kl(mean.float(), logvar.float(), ref_mean.float(), ref_logvar.float())
        terms["ref_kl"] = ((ref_kl * lat_valid).sum(), lat_valid.sum().float())
        z = self.vae.posterior_sample(mean, logvar, generator) if w.sample_posterior else mean
        z0 = self.vae.normalize(z)

        rng = batch.get("rng") or {}
        n_prose = batch["text"]["input_ids"].shape[0] if batch.get("text") else 0
        if n_prose:
            gen = generator
            if "step" in rng:  # the global batch's tables, this slice's rows
                gen = torch.Generator(z0.device).manual_seed(int(rng["step"]))
            lay = text_to_text_layout(z0[:n_prose], lat_s[:n_prose], lat_p[:n_prose],
                                      self.layout_cfg, gen, rows=rng.get("rows"))
            v = self._velocity(lay)
            terms["fm_text_to_text"] = self._velocity_error(lay, v)
            if w.lambda_x0_ce > 0:
                terms["x0_ce"] = self._x0_ce(lay, v, ids[:n_prose], lat_s[:n_prose],
                                             lat_p[:n_prose])
        if batch.get("pairs"):
            after = terms["fm_text_to_text"][0] if n_prose else None
            terms.update({f"fm_{k}": v for k, v in self._pair_flow_losses(
                batch["pairs"], z0[n_prose:], w, generator, after).items()})
        return terms

    def _flow_loss(self, lay, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) of the velocity MSE over a layout's loss tokens (per row: [B] each)."""
        return self._velocity_error(lay, self._velocity(lay), per_row)

    def _velocity(self, lay) -> torch.Tensor:
        """The prior's velocity [B, N, prior width] on a layout."""
        return self.prior(self.prior_in(lay.z), lay.t, lay.modality, lay.positions,
                          lay.attention_mask())

    def _velocity_error(self, lay, v: torch.Tensor, per_row: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        target = self.prior_in(lay.target)
        err = (v.float() - target.float()).pow(2).mean(-1) * lay.loss_mask  # [B, N]
        if per_row:
            return err.sum(1), lay.loss_mask.sum(1).float()
        return err.sum(), lay.loss_mask.sum().float()

    def _x0_ce(self, lay, v: torch.Tensor, ids: torch.Tensor, lat_sample_ids: torch.Tensor,
               lat_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) of the token CE of the prior's clean estimate (LossConfig.lambda_x0_ce)
        on a text-to-text 2L layout [clean z0 | noisy z_t] of token rows `ids` [B, L * p]
        (latent-level sample ids and positions [B, L]):
        z0_hat = z_t - t v at the loss latents, the clean z0 elsewhere (history, pinned prompt),
        decoded causally by the Text VAE decoder with its weights detached."""
        n, d, p = lay.z.shape[1] // 2, lay.z.shape[-1], self.vae.config.patch_size
        z0, z_t, t = lay.z[:, :n], lay.z[:, n:], lay.t[:, n:, None]  # [B, n, d], [B, n, 1]
        loss = lay.loss_mask[:, n:]  # [B, n]
        z0_hat = z_t.float() - t.float() * v[:, n:, :d].float()  # the flow's x0 (DESIGN §3)
        z_mix = torch.where(loss[..., None], z0_hat, z0.float())  # [B, n, d]
        logits, _ = self.vae.decode(self.vae.denormalize(z_mix), lat_sample_ids, lat_positions,
                                    frozen=True)  # [B, n * p, V]
        tok_loss = loss.repeat_interleave(p, 1)  # [B, n * p]
        ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none")
        return (ce * tok_loss.flatten()).sum(), tok_loss.sum().float()

    def _pair_flow_losses(self, pairs: dict, z_pieces: torch.Tensor, w: LossConfig,
                          generator, after: torch.Tensor | None = None
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Flow loss (sum, count) of every task: the latents of each sample's text pieces and
        images placed as its recipe says (unified.layout.place), all samples in one 2L layout
        and one prior call whatever tasks the batch holds (under FSDP every rank must call the
        sharded prior equally often), the errors then summed per task. Samples with "seeds"
        draw their times and noise from their own generators; a sample marked not "valid"
        (its image failed to decode) keeps its place with no loss. `after` (the prose flow
        loss) enters the layout times zero: backward then finishes this prior call before it
        starts the prose call's, the same order on every rank (FSDP2 gathers the sharded
        blocks in that order, and ranks that interleave the two calls differently deadlock)."""
        lay = self.pair_layout(pairs, z_pieces, w.sample_posterior, generator, after)
        err, count = self._flow_loss(lay, per_row=True)
        losses = {}
        for task in dict.fromkeys(pairs["tasks"]):
            rows = torch.tensor([name == task for name in pairs["tasks"]], device=err.device)
            losses[task] = ((err * rows).sum(), (count * rows).sum())
        return losses

    def pair_layout(self, pairs: dict, z_pieces: torch.Tensor, sample_posterior: bool = False,
                    generator=None, after: torch.Tensor | None = None):
        """The 2L layout of collated task samples (`_pair_flow_losses`; also the answer
        scorer tasks.image_to_text.answer_flow_loss): each sample's text-piece latents
        (rows of `z_pieces`, [R, L, d]) and encoded images placed by its recipe."""
        texts = [z_pieces[r, s:s + n] for r, s, n in pairs["piece_index"].tolist()]
        images = []
        if pairs["images"].shape[0]:
            with torch.no_grad():  # the image VAE is frozen in stage 2
                images = list(self.encode_images(pairs["images"], sample_posterior, generator))
        grid = torch.zeros(0, 2)
        if self.image_vae is not None:  # a batch's images share one size (one bucket)
            grid = self.image_grid(*pairs["images"].shape[-2:]) if len(images) else \
                self.image_grid()
        samples = [place(recipe, texts, images, grid) for recipe in pairs["recipes"]]
        gen = generator
        if pairs.get("seeds") is not None:
            dev = samples[0][0].z0.device
            gen = [torch.Generator(dev).manual_seed(int(seed)) for seed in pairs["seeds"]]
        lay = build_layout(samples, self.block_size, self.times, list(pairs["cond_drop"]), gen)
        # ties that weigh nothing, for FSDP2: the prior's input always depends on the Text VAE
        # (a slice of text-to-image samples alone holds only clean, detached text), so its
        # backward hooks fire at the same point on every rank; `after`: see above
        tie = z_pieces.sum() if after is None else z_pieces.sum() + after
        lay.z = lay.z + 0.0 * tie
        if pairs.get("valid") is not None:
            lay.loss_mask = lay.loss_mask & torch.tensor(pairs["valid"], device=lay.z.device)[:, None]
        return lay

    # ----------------------------------------------------------------- save / load
    def index(self) -> dict:
        """model_index.json: (library, class) of each part, in the diffusers pipeline layout,
        plus the inference layout."""
        parts = {"text_vae": self.vae, "prior": self.prior, "image_vae": self.image_vae,
                 "tokenizer": self.tokenizer}
        from diffusers import __version__ as diffusers_version

        return {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers_version,
                **{k: list(PARTS[k]) if v is not None else [None, None] for k, v in parts.items()},
                "block_size": self.block_size, "image_patch_size": self.image_patch_size,
                "image_size": self.image_size,
                "image_time": [self.image_time.loc, self.image_time.scale],
                "generation": self.generation.to_json()}

    def save_pretrained(self, folder: str | Path, weights: bool = True,
                        link_image_vae: bool = False) -> None:
        """Write the model folder; `weights=False` writes configs, tokenizer and index only
        (the skeleton of a sharded checkpoint). `link_image_vae` (training checkpoints): a
        frozen pretrained image VAE is written as its config and a reference to the weights
        in its folder (image.pretrained), not as a copy; a model folder to keep or share
        (final/, cola export) holds every weight itself."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in (("text_vae", self.vae), ("prior", self.prior),
                           ("image_vae", self.image_vae)):
            if part is None:
                continue
            if name == "image_vae" and link_image_vae and self.image_vae_linkable:
                iv.save_reference(part, folder / name, self.image_vae_source)
                continue
            (part.save_pretrained if weights else part.save_config)(folder / name)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        (folder / MODEL_INDEX).write_text(json.dumps(self.index(), indent=2))

    @property
    def image_vae_linkable(self) -> bool:
        """A frozen image VAE loaded from a pretrained folder (checkpoints refer to it)."""
        return self.image_vae_source is not None and not self.image_vae_trainable

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        weights: bool = True) -> ColaModel:
        """Load a model folder (`weights=False`: parts built from their configs only)."""
        folder = Path(folder)
        if not (folder / MODEL_INDEX).is_file():
            raise FileNotFoundError(
                f"no Cola model at {folder}: expected {folder / MODEL_INDEX} (a folder written "
                "by `cola train` or `cola export`)")
        index = read_index(folder)
        parts = {}
        for name in ("text_vae", "prior", "image_vae"):
            if index[name] is None:
                parts[name] = None
                continue
            klass = getattr(importlib.import_module(PARTS[name][0]), PARTS[name][1])
            if name == "image_vae" and iv.reference_of(folder / name) is not None:
                parts[name] = iv.load_image_vae(folder / name)  # weights in image.pretrained
                continue
            if weights:
                parts[name] = load_part(klass, folder / name)
            else:
                check_folder(folder / name, weights=False)
                parts[name] = klass.from_config(klass.load_config(folder / name))
        model = cls(parts["text_vae"], parts["prior"], load_tokenizer(folder / "tokenizer"),
                    TextLayoutConfig(block_size=index["block_size"]), parts["image_vae"],
                    image_patch_size=index["image_patch_size"],
                    image_time=TimeConfig(*index["image_time"]),
                    image_size=index["image_size"])
        model.generation = index["generation"]
        if parts["image_vae"] is not None:
            model.image_vae_source = iv.reference_of(folder / "image_vae")
        # weights may be stored in bf16 to keep the bundled model small; compute in fp32
        return model.to(device=device, dtype=torch.float32).eval()
