"""The trainer's data: the global batch stream (the same on every rank) cut into this rank's
micro-batches, with only this rank's images decoded, in DataLoader worker processes or not.

Every rank reads the same records, tokenizes and packs the same global batches (cheap: text
and undecoded image bytes), and keeps slices `m * world + rank` (m < grad_accum) of each, so a
multi-rank step sees exactly the data a single process would. Images stay undecoded
(unified.data.records.ImageRef) until a rank cuts out its slices: it decodes those samples alone,
with a random crop drawn from the sample's own seed (the same whoever decodes it). With
`workers` > 0, worker w of a rank builds every step but decodes and collates only the steps
`start + w + k * workers`; the DataLoader returns them in step order. With aspect-ratio
`buckets` (unified/data/buckets.py) each global batch is one bucket's samples, formed from the
same stream on every rank and worker, and its images are decoded at that bucket's size.

An image that fails to decode keeps its sample's place as a placeholder without loss (a
zero image, `valid=False`, counted), so slices keep their sizes and their equivalence with a
single process. A stream that yields nothing usable for `limit` samples in a row (SkipCounter)
ends in an {"error": message} item, which the trainer turns into a clean stop on every rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from unified.data.buckets import bucketed
from unified.data.streams import DataError, SkipCounter, TaskSample, collate_task_samples


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the same in every process: no salted hash)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Slicing:
    """How a global batch of `rows` prose rows and `pairs` task samples is cut: into
    world x grad_accum slices, this rank's being `m * world + rank`."""

    rank: int = 0
    world: int = 1
    grad_accum: int = 1
    rows: int = 0
    pairs: int = 0

    @property
    def slices(self) -> int:
        return self.world * self.grad_accum

    def mine(self) -> list[int]:
        return [m * self.world + self.rank for m in range(self.grad_accum)]


class StepStream(IterableDataset):
    """Per step from `start`: {"pos", "micro": this rank's micro-batches, "stats"}, or
    {"pos", "error"} once a stream gave up. `texts()` / `pairs()` make the global streams of
    packed prose batches and task samples (None: not in this run)."""

    def __init__(self, texts: Callable[[], Iterator[dict]] | None,
                 pairs: Callable[[], Iterator[TaskSample]] | None, slicing: Slicing, *,
                 seed: int, start: int, seq_len: int, pad_id: int, image_size: int,
                 flip: bool = False, skips: dict[str, SkipCounter] | None = None,
                 decode: bool = True, buckets: list[tuple[int, int]] | None = None):
        self.texts, self.pairs, self.slicing = texts, pairs, slicing
        self.buckets = buckets  # (height, width) sizes: each global batch one of them
        self.decode_images = decode  # False: the model uses no image (stage 1, frozen VAE)
        self.seed, self.start, self.seq_len, self.pad_id = seed, start, seq_len, pad_id
        self.image_size, self.flip = image_size, flip
        self.skips = skips or {}
        self.images = self.skips.get("images") or SkipCounter("images")
        self.decoded = 0  # images this process decoded

    # ----------------------------------------------------------------- global stream
    def global_batches(self) -> Iterator[dict]:
        """The deterministic global stream: per step "text" (the packed prose rows) and
        "pairs" (the task samples, images undecoded)."""
        texts = self.texts() if self.texts is not None else None
        pairs = self.pairs() if self.pairs is not None else None
        groups = bucketed(pairs, self.slicing.pairs, self.buckets) \
            if pairs is not None and self.buckets else None
        while True:
            batch = {}
            if texts is not None:
                batch["text"] = next(texts)
            if groups is not None:  # one aspect-ratio bucket per batch (unified/data/buckets.py)
                batch["size"], batch["pairs"] = next(groups)
            elif pairs is not None:
                batch["pairs"] = [next(pairs) for _ in range(self.slicing.pairs)]
            yield batch

    # ----------------------------------------------------------------- this rank's part
    def decode(self, smp: TaskSample, seed: int, size: int | tuple[int, int] | None = None
               ) -> TaskSample:
        """The sample with its images decoded (train crop from `seed`) to `size` (default
        image_size: square; (height, width): a bucket's); a placeholder with valid=False when
        one does not decode."""
        images, valid = [], smp.valid
        size = self.image_size if size is None else size
        h, w = (size, size) if isinstance(size, int) else size
        if not self.decode_images:
            return dataclasses.replace(smp, images=[], seed=seed)
        for k, img in enumerate(smp.images):
            if torch.is_tensor(img):
                images.append(img)
                continue
            self.decoded += 1
            try:
                images.append(img.decode(size, train=True, seed=mix_seed(seed, k),
                                         flip=self.flip))
                self.images.ok()
            except ValueError as e:
                self.images(e)  # counted; raises DataError after too many in a row
                images.append(torch.zeros(3, h, w))
                valid = False
        return dataclasses.replace(smp, images=images, seed=seed, valid=valid)

    def cut(self, pos: int, batch: dict, slices: list[int] | None = None) -> list[dict]:
        """Micro-batches of global batch `pos`: the given slices (default: this rank's), their
        images decoded, task samples collated; each carries its randomness ("rng": seeds from
        the data position and the slice; one seed per task sample)."""
        s = self.slicing
        b, pb = s.rows // s.slices, s.pairs // s.slices
        step_seed = mix_seed(self.seed, pos)
        micro = []
        for i in (s.mine() if slices is None else slices):
            mb = {"rng": {"step": step_seed, "slice": mix_seed(step_seed, i),
                          "rows": (i * b, s.rows)}}
            if "text" in batch:
                mb["text"] = {k: v[i * b:(i + 1) * b] for k, v in batch["text"].items()}
            if "pairs" in batch:
                mine = [self.decode(smp, mix_seed(step_seed, -1, j), batch.get("size"))
                        for j, smp in enumerate(batch["pairs"][i * pb:(i + 1) * pb],
                                                start=i * pb)]
                mb["pairs"] = collate_task_samples(mine, seq_len=self.seq_len, pad_id=self.pad_id)
            micro.append(mb)
        return micro

    # ----------------------------------------------------------------- iteration
    def _counts(self) -> dict[str, tuple[dict, dict]]:
        return {k: (dict(c.counts), dict(c.fixed)) for k, c in self.skips.items()}

    def _delta(self, before: dict) -> dict[str, tuple[dict, dict]]:
        out = {}
        for k, (counts, fixed) in self._counts().items():
            c0, f0 = before.get(k, ({}, {}))
            out[k] = ({n: v - c0.get(n, 0) for n, v in counts.items() if v != c0.get(n, 0)},
                      {n: v - f0.get(n, 0) for n, v in fixed.items() if v != f0.get(n, 0)})
        return out

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        pos = -1
        try:
            batches = self.global_batches()
            before = self._counts()
            for pos, batch in enumerate(batches):
                if pos < self.start or (pos - self.start) % nw != wid:
                    before = self._counts()  # counted by the process that takes this step
                    continue
                n0 = self.decoded
                micro = self.cut(pos, batch)
                yield {"pos": pos, "micro": micro, "decoded": self.decoded - n0,
                       "stats": self._delta(before)}
                before = self._counts()
        except DataError as e:
            yield {"pos": pos + 1, "error": str(e)}
