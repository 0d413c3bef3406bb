"""Measurements of a trained model on held-out data (`cola eval`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from prior.flow import interpolate
from unified.data.streams import pack_batches, text_samples
from unified.model import ColaModel


def heldout_texts(data: str | Path | None, max_docs: int) -> list[str]:
    """Held-out documents: from shards if `data` exists, else the default corpus's split."""
    if data is not None and Path(data).exists():
        texts = text_samples(str(data), resample=False)
    else:
        from unified.data.corpus import is_heldout, iter_default_corpus

        texts = (text for key, text in iter_default_corpus() if is_heldout(key))
    return [t for _, t in zip(range(max_docs), texts)]


@torch.no_grad()
def evaluate_text_vae(model: ColaModel, data: str | Path | None = None, *, max_docs: int = 500,
                      noise_t: float = 0.1, seq_len: int | None = None, seed: int = 0) -> dict:
    """Token reconstruction accuracy from the posterior mean, clean and noised to t = noise_t
    along the flow path in the prior's normalized latent space."""
    vae = model.vae.eval()
    texts = heldout_texts(data, max_docs)
    if not texts:
        raise ValueError(f"no held-out documents found in {data}")
    seq_len = seq_len or vae.config.max_len
    gen = torch.Generator(device=vae.device).manual_seed(seed)
    correct = {"clean": 0, "noised": 0}
    total = 0
    for batch in pack_batches(texts, model.tokenizer, seq_len=seq_len, batch_size=8,
                              drop_last=False, multiple_of=vae.config.patch_size):
        batch = {k: v.to(vae.device) for k, v in batch.items()}
        ids, sample_ids, positions = batch["input_ids"], batch["sample_ids"], batch["positions"]
        real = (sample_ids >= 0) & (ids != model.tokenizer.pad_token_id)  # not patch padding
        mean, _ = vae.encode(ids, sample_ids, positions)
        lat_s, lat_p = vae.latent_meta(sample_ids, positions)
        z = vae.normalize(mean)
        eps = torch.randn(z.shape, device=z.device, generator=gen)
        t = torch.full(z.shape[:-1], noise_t, device=z.device)
        for name, zz in (("clean", z), ("noised", interpolate(z, eps, t))):
            logits, _ = vae.decode(vae.denormalize(zz), lat_s, lat_p)
            correct[name] += int(((logits.argmax(-1) == ids) & real).sum())
        total += int(real.sum())
    return {"documents": len(texts), "tokens": total,
            "token_accuracy": correct["clean"] / total,
            f"token_accuracy_at_t{noise_t:g}": correct["noised"] / total}


# --------------------------------------------------------------------------------------------
# generated text: generative perplexity under a judge LM, and unigram entropy


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the token frequencies of one sample: low when it repeats itself
    (a degenerate sample can have a low perplexity under any judge)."""
    if not ids:
        return 0.0
    counts = torch.bincount(torch.tensor(ids)).float()
    p = counts[counts > 0] / len(ids)
    return float(-(p * p.log()).sum())


def generative_perplexity(judge, contexts: list[list[int]], samples: list[list[int]]) -> dict:
    """exp(mean NLL per token) of `samples` (token ids, EOS excluded) after their `contexts`
    under `judge` (an autoregressive LM with `nll`, e.g. unified.baselines.ARModel), pooled over
    all tokens; plus the mean unigram entropy and length of the samples. Empty samples carry no
    tokens (they still count in the entropy and length means)."""
    keep = [i for i, s in enumerate(samples) if s]
    nll = judge.nll([contexts[i] for i in keep], [samples[i] for i in keep]) if keep else []
    tokens = sum(len(x) for x in nll)
    total = float(sum(x.sum() for x in nll))
    return {"gen_ppl": math.exp(total / tokens) if tokens else float("nan"),
            "entropy": sum(map(unigram_entropy, samples)) / max(1, len(samples)),
            "length": sum(map(len, samples)) / max(1, len(samples)), "tokens": tokens}
