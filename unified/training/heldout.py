"""Held-out loss during training: `eval_batches` global batches of held-out data (prose from
data.heldout, task samples from data.pairs_heldout), drawn once with a fixed seed and cut by
rank like the training batches, so every evaluation sees the same data and the same noise;
the loss terms are global means over all ranks' slices, as in training."""

from __future__ import annotations

import logging

import torch

from unified.data.streams import DataError, SkipCounter, text_batches, to_device
from unified.losses import means
from unified.training import distributed as dist_utils
from unified.training.batches import Slicing, StepStream

log = logging.getLogger("cola.train")


class HeldOut:
    def __init__(self) -> None:
        self.cache: list[list[dict]] | None = None

    def batches(self, tr) -> list[list[dict]]:
        """This rank's micro-batches of the held-out batches of trainer `tr` (drawn once)."""
        if self.cache is not None:
            return self.cache
        d, t = tr.cfg.data, tr.tcfg
        text = d.heldout if tr.data.batch_size and d.heldout else None
        pairs = d.pairs_heldout if tr.tasks is not None and d.pairs_heldout else None
        self.cache = []
        if not (text or pairs):
            if tr.dist.is_main:
                log.warning("stage.eval_every is set but neither data.heldout (with prose) "
                            "nor data.pairs_heldout (with tasks) is: no held-out loss")
            return self.cache
        vae = getattr(tr.model, "vae", None)
        patch = vae.config.patch_size if vae is not None else 1
        tok, seed = tr.model.tokenizer, t.seed + 99991
        skips = {k: SkipCounter(f"held-out {k}", d.max_bad_samples)
                 for k in ("text", "pairs", "images")}
        slicing = Slicing(tr.dist.rank, tr.dist.world, tr.cfg.optim.grad_accum,
                          tr.data.batch_size if text else 0,
                          tr.data.pair_batch_size if pairs else 0)

        def texts():
            return text_batches(text, tok, seq_len=d.seq_len, batch_size=tr.data.batch_size,
                                seed=seed, skips=skips["text"], multiple_of=patch,
                                same_on_all_ranks=True)

        def samples():
            return tr.tasks.samples(tok, seed, skips["pairs"], source=pairs)

        stream = StepStream(texts if text else None, samples if pairs else None, slicing,
                            seed=seed, start=0, seq_len=d.seq_len, pad_id=tok.pad_token_id,
                            image_size=tr.cfg.image.size, skips=skips)
        for _, item in zip(range(t.eval_batches), stream):
            if item.get("error"):
                raise DataError(f"held-out data: {item['error']}")
            self.cache.append(item["micro"])
        return self.cache

    @torch.no_grad()
    def evaluate(self, tr) -> dict[str, float]:
        """{"heldout_loss", "heldout_<term>": ...} of trainer `tr`'s model now ({} when there
        is no held-out data, or before the first step fixed the loss terms)."""
        batches = self.batches(tr)
        names = tr._names
        if not batches or names is None:
            return {}
        dev = tr.device
        total = torch.zeros(2 * len(names), dtype=torch.float64, device=dev)
        zero = torch.zeros((), device=dev)
        for micro in batches:
            for mb in micro:
                mb = to_device(mb, dev)
                tr.gen.manual_seed(mb["rng"]["slice"])
                terms = tr._terms(mb)
                total += torch.cat([
                    torch.stack([terms[k][0].float() if k in terms else zero for k in names]),
                    torch.stack([terms[k][1].float() if k in terms else zero for k in names]),
                ]).double()
        total = dist_utils.sum_across_ranks(total, tr.dist).cpu()
        n = len(names)
        loss, logs = tr._combine(means(dict(zip(names, total[:n])),
                                       dict(zip(names, total[n:].tolist()))))
        return {"heldout_loss": float(loss), **{f"heldout_{k}": float(v) for k, v in logs.items()}}
