"""Diagnostics of a trained model's text side (issue 14: does the prior follow its prompt?).

- `history_gain`: the held-out flow loss per time bucket with the history visible, hidden
  (noisy blocks see no clean block: the prior is unconditional on everything before its own
  block) and with the condition dropped (the CFG unconditional branch: the prompt's whole
  blocks C are hidden, earlier generated blocks stay visible). Every variant is computed on
  the same latents, noise and times (common random numbers), so the differences are the
  history's doing alone.
- `prompt_sensitivity`: how much continuations of different prompts (one seed) overlap,
  against continuations of one prompt under different seeds (mean pairwise Jaccard overlap of
  word bigrams). A model that follows its prompt has a ratio near 1 or below.
- `latent_geometry`: per latent dimension, the posterior std against the spread (std) of the
  posterior means over tokens; and how often a latent's nearest neighbour encodes another
  token, within the posterior noise (a collision: samples of the two cannot be told apart).
- `decoder_robustness`: the decoder's token accuracy on latents noised along the flow path.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence

import torch

from prior.attention import ensure_nonempty_rows
from prior.flow import interpolate
from unified.layout import Layout, text_to_text_layout
from unified.model import ColaModel

BUCKETS: tuple[tuple[float, float], ...] = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
VARIANTS = ("visible", "hidden", "dropped")
NOISE_TIMES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_PROMPTS = (
    "The function returns",
    "Open the file and",
    "Raise an exception if",
    "A list of the",
    "Return a new dictionary with",
    "If the value is not",
    "This module provides",
    "The default encoding is",
)


# ----------------------------------------------------------------------------- (a) history gain


def history_mask(lay: Layout, variant: str) -> torch.Tensor:
    """The [B, N, N] attention mask of a layout under one variant: "visible" (the training
    rule, no condition dropped), "hidden" (no noisy query sees any clean key: every earlier
    block is hidden) or "dropped" (every sample's droppable condition hidden, as in CFG)."""
    valid = lay.meta.sample >= 0
    if variant == "dropped":
        return dataclasses.replace(lay, cond_dropped=valid).attention_mask()
    mask = dataclasses.replace(lay, cond_dropped=torch.zeros_like(valid)).attention_mask()
    if variant == "visible":
        return mask
    if variant == "hidden":
        noisy = lay.meta.noisy
        return ensure_nonempty_rows(mask & ~(noisy[:, :, None] & ~noisy[:, None, :]))
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")


def eval_layout(model: ColaModel, batch: dict, generator: torch.Generator,
                posterior: str = "mean") -> Layout:
    """The training layout of packed held-out rows, every sample with a prompt (a uniform
    prefix, as in training) and no condition dropped; latents are the posterior means (what
    generation encodes a prompt to) or, with posterior="sample", posterior samples."""
    vae = model.vae
    ids, sample_ids, positions = batch["input_ids"], batch["sample_ids"], batch["positions"]
    mean, logvar = vae.encode(ids, sample_ids, positions)
    z = vae.posterior_sample(mean, logvar, generator) if posterior == "sample" else mean
    lat_s, lat_p = vae.latent_meta(sample_ids, positions)
    cfg = dataclasses.replace(model.layout_cfg, uncond_prompt_prob=0.0, cond_drop_prob=0.0)
    return text_to_text_layout(vae.normalize(z).float(), lat_s, lat_p, cfg, generator)


def at_times(lay: Layout, lo: float, hi: float, generator: torch.Generator) -> Layout:
    """The same layout with every noisy loss token re-noised at a time drawn uniformly from
    [lo, hi), one per (row, sample, block) as in training; pinned prompt tokens stay clean.
    The noise eps and the velocity target eps - z0 are unchanged."""
    n = lay.z.shape[1] // 2  # [clean z0 | noisy z_t], token i of each half is the same token
    z0, eps = lay.z[:, :n], lay.target[:, n:] + lay.z[:, :n]
    sample, block = lay.meta.sample[:, n:].clamp_min(0), lay.meta.block[:, n:]
    b, s, k = sample.shape[0], int(sample.max()) + 1, int(block.max()) + 1
    table = lo + (hi - lo) * torch.rand(b, s * k, device=z0.device, generator=generator)
    t_new = table.gather(1, sample * k + block)  # [B, n]
    free = lay.loss_mask[:, n:]
    t = torch.where(free, t_new, lay.t[:, n:])
    z_t = torch.where(free[..., None], interpolate(z0, eps, t_new), lay.z[:, n:])
    return dataclasses.replace(lay, z=torch.cat([z0, z_t], 1), t=torch.cat([lay.t[:, :n], t], 1))


def token_errors(model: ColaModel, lay: Layout, mask: torch.Tensor) -> torch.Tensor:
    """Per-token velocity MSE [B, N], as in ColaModel._flow_loss (before its loss-mask mean)."""
    v = model.prior(model.prior_in(lay.z), lay.t, lay.modality, lay.positions, mask)
    return (v.float() - model.prior_in(lay.target).float()).pow(2).mean(-1)


@torch.no_grad()
def history_gain(model: ColaModel, batches: Iterable[dict], buckets=BUCKETS, seed: int = 0,
                 posterior: str = "mean") -> dict:
    """{"loss": {variant: [loss per bucket]}, "tokens": [loss tokens per bucket], "buckets"}:
    the held-out flow loss per time bucket under each attention variant (module docstring)."""
    g = torch.Generator(device=model.vae.device).manual_seed(seed)
    sums = {v: [0.0] * len(buckets) for v in VARIANTS}
    tokens = [0] * len(buckets)
    for batch in batches:
        batch = {k: v.to(model.vae.device) for k, v in batch.items()}
        base = eval_layout(model, batch, g, posterior)
        masks = {v: history_mask(base, v) for v in VARIANTS}
        for i, (lo, hi) in enumerate(buckets):
            lay = at_times(base, lo, hi, g)
            for v in VARIANTS:
                sums[v][i] += float((token_errors(model, lay, masks[v]) * lay.loss_mask).sum())
            tokens[i] += int(lay.loss_mask.sum())
    if not any(tokens):
        raise ValueError("no held-out tokens carry a flow loss: the documents are too short")
    loss = {v: [s / max(1, n) for s, n in zip(sums[v], tokens)] for v in VARIANTS}
    return {"buckets": [list(b) for b in buckets], "loss": loss, "tokens": tokens}


# ----------------------------------------------------------------------------- (b) prompt sensitivity


def word_bigrams(text: str) -> set[tuple[str, str]]:
    """Adjacent pairs of lowercased whitespace-separated words."""
    words = text.lower().split()
    return set(zip(words, words[1:]))


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def distinct_bigrams(text: str) -> float:
    """Distinct word bigrams / all word bigrams of one text (distinct-2; 1 = no bigram
    repeats). A text that loops ("the the the ...") scores near 0, so a low overlap ratio
    bought with repetition shows here. A text of fewer than two words counts as 1."""
    words = text.lower().split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def mean_pairwise_overlap(texts: Sequence[str]) -> float:
    """Mean Jaccard overlap of word bigrams over every pair of texts."""
    grams = [word_bigrams(t) for t in texts]
    pairs = list(itertools.combinations(grams, 2))
    if not pairs:
        raise ValueError("need at least two texts to compare")
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs)


def overlap_ratio(across_prompts: float, across_seeds: float) -> float:
    if across_seeds == 0:
        return float("inf") if across_prompts > 0 else float("nan")
    return across_prompts / across_seeds


def prompt_sensitivity(generate: Callable[[str, int], str], prompts: Sequence[str],
                       seeds: Sequence[int]) -> dict:
    """Continue every prompt under every seed (`generate(prompt, seed)`, one prompt per call so
    a seed means the same noise for every prompt). across_prompts: the mean over seeds of the
    mean pairwise overlap among the prompts' continuations; across_seeds: the mean over prompts
    of the overlap among its seeds' continuations; ratio = across_prompts / across_seeds."""
    if len(prompts) < 2 or len(seeds) < 2:
        raise ValueError("prompt sensitivity needs at least two prompts and two seeds")
    out = {(p, s): generate(p, s) for p in prompts for s in seeds}
    a = sum(mean_pairwise_overlap([out[p, s] for p in prompts]) for s in seeds) / len(seeds)
    b = sum(mean_pairwise_overlap([out[p, s] for s in seeds]) for p in prompts) / len(prompts)
    words = sum(len(t.split()) for t in out.values()) / len(out)
    distinct = sum(distinct_bigrams(t) for t in out.values()) / len(out)
    return {"across_prompts": a, "across_seeds": b, "ratio": overlap_ratio(a, b),
            "words": words, "distinct2": distinct,
            "samples": {f"{p} | seed {s}": t for (p, s), t in out.items()}}


def read_prompts(path: str) -> list[str]:
    """One prompt per non-blank line of a text file."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if len(prompts) < 2:
        raise ValueError(f"{path}: need at least two prompts (one per line), found {len(prompts)}")
    return prompts


def generator_fn(model, max_new_tokens: int, steps: int = 8, guidance: float = 2.0,
                 temperature: float = 1.0, noise_scale: float = 1.0
                 ) -> Callable[[str, int], str]:
    """`generate(prompt, seed)` for a Cola model (the flow samples from noise of std
    `noise_scale`, the decoder is greedy) or an AR / MDLM baseline (token sampling at
    `temperature`: greedy would not depend on the seed)."""
    if isinstance(model, ColaModel):
        from unified.generate import GenerationConfig, TextGenerator

        engine = TextGenerator(model)
        return lambda p, s: engine.generate(p, GenerationConfig(
            max_new_tokens=max_new_tokens, steps=steps, guidance=guidance, temperature=0.0, seed=s,
            noise_scale=noise_scale))
    kw = {"steps": steps} if model.kind == "mdlm" else {}
    return lambda p, s: model.generate([p], max_new_tokens, temperature=temperature, seed=s,
                                       **kw)[0]


# ----------------------------------------------------------------------------- (c), (d) latents


def _valid_rows(model: ColaModel, batch: dict) -> tuple[torch.Tensor, ...]:
    vae = model.vae
    batch = {k: v.to(vae.device) for k, v in batch.items()}
    ids, sample_ids, positions = batch["input_ids"], batch["sample_ids"], batch["positions"]
    mean, logvar = vae.encode(ids, sample_ids, positions)
    real = (sample_ids >= 0) & (ids != model.tokenizer.pad_token_id)
    return ids, sample_ids, positions, mean.float(), logvar.float(), real


@torch.no_grad()
def latent_geometry(model: ColaModel, batches: Iterable[dict], max_latents: int = 4096,
                    seed: int = 0) -> dict:
    """Per dimension (in the prior's normalized units): `posterior_std` (mean over tokens of
    the posterior std), `mean_spread` (std over tokens of the posterior means) and their ratio
    `snr`; over up to `max_latents` latents: `nn_other_token` (share whose nearest other latent
    encodes a different token) and `collisions` (share whose nearest different-token latent
    lies closer than the latent's own posterior noise radius, sqrt(sum of its variances))."""
    if model.vae.config.patch_size != 1:
        raise ValueError("latent geometry needs patch_size 1 (one latent per token)")
    means, stds, toks = [], [], []
    scale = model.vae.scale.float()
    for batch in batches:
        ids, _, _, mean, logvar, real = _valid_rows(model, batch)
        means.append(model.vae.normalize(mean)[real])
        stds.append((0.5 * logvar).exp()[real] / scale)
        toks.append(ids[real])
    m, s, ids = torch.cat(means), torch.cat(stds), torch.cat(toks)
    if len(m) < 2:
        raise ValueError("need at least two held-out tokens for the latent geometry")
    post_std, spread = s.mean(0), m.std(0)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(m), generator=g)[:max_latents].to(m.device)
    m, s, ids = m[pick], s[pick], ids[pick]
    d = torch.cdist(m, m)
    d.fill_diagonal_(float("inf"))
    nn = d.argmin(1)
    other = d.masked_fill(ids[:, None] == ids[None, :], float("inf")).min(1).values
    radius = s.pow(2).sum(1).sqrt()
    return {"posterior_std": post_std.tolist(), "mean_spread": spread.tolist(),
            "snr": (spread / post_std.clamp_min(1e-12)).tolist(), "latents": len(m),
            "distinct_tokens": int(ids.unique().numel()),
            "nn_other_token": float((ids[nn] != ids).float().mean()),
            "collisions": float((other < radius).float().mean()),
            "mean_nn_distance": float(d.min(1).values.mean()),
            "mean_noise_radius": float(radius.mean())}


@torch.no_grad()
def decoder_robustness(model: ColaModel, batches: Iterable[dict], times=NOISE_TIMES,
                       seed: int = 0) -> dict:
    """Token accuracy of the decoder on posterior means noised along the flow path to each
    t in `times` (z_t = (1 - t) z + t eps in the prior's normalized space), one eps per batch
    shared by every t."""
    vae = model.vae
    g = torch.Generator(device=vae.device).manual_seed(seed)
    right, total = [0] * len(times), 0
    for batch in batches:
        ids, sample_ids, positions, mean, _, real = _valid_rows(model, batch)
        lat_s, lat_p = vae.latent_meta(sample_ids, positions)
        z = vae.normalize(mean)
        eps = torch.randn(z.shape, device=z.device, generator=g)
        for i, t in enumerate(times):
            zt = interpolate(z, eps, torch.full(z.shape[:-1], float(t), device=z.device))
            logits, _ = vae.decode(vae.denormalize(zt), lat_s, lat_p)
            right[i] += int(((logits.argmax(-1) == ids) & real).sum())
        total += int(real.sum())
    if not total:
        raise ValueError("no held-out tokens to decode")
    return {"times": list(times), "accuracy": [r / total for r in right], "tokens": total}

