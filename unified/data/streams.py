"""Webdataset pipelines: shard lists, robust sample reading (text, image-text), text packing.

Shards use the img2dataset layout (``KEY.txt`` + optional ``KEY.json``). A bad sample or a
truncated tar never stops a stream: the error goes to a :class:`SkipCounter`, which logs a
warning and counts it, and reading continues with the next sample or shard.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from unified.layout import MODALITY_IMAGE, SegmentSpec
from vaes.tokenizer import encode_document

logger = logging.getLogger("cola.data")


class MissingTextError(ValueError):
    """A sample without a ``.txt`` member (or with an empty one)."""


# Exceptions that mean a bug or a bad setting (e.g. a float where a size is expected), never a
# bad sample: the skip handler re-raises them instead of counting every sample as bad data.
CODE_ERRORS = (TypeError, AttributeError, NameError, ImportError, AssertionError,
               NotImplementedError, SyntaxError, RecursionError, MemoryError)


def is_code_error(exn: BaseException) -> bool:
    """True for a code or config error, also when wrapped (as webdataset wraps decoding)."""
    seen = 0
    while exn is not None and seen < 8:
        if isinstance(exn, CODE_ERRORS):
            return True
        exn, seen = exn.__cause__, seen + 1
    return False


class SkipCounter:
    """Webdataset error handler that logs, counts per kind, and continues.

    Pass an instance as ``handler=`` to webdataset stages. ``counts`` maps a kind (the
    exception class name, with the cause for wrapped decoding errors) to how often it was
    skipped; ``total`` is the sum. A code or config error (``CODE_ERRORS``) is not bad data:
    it is raised, not counted.
    """

    def __init__(self, name: str = "data") -> None:
        self.name = name
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @staticmethod
    def kind(exn: BaseException) -> str:
        name = type(exn).__name__
        if exn.__cause__ is not None:
            name = f"{name}({type(exn.__cause__).__name__})"
        return name

    @staticmethod
    def where(exn: BaseException) -> str | None:
        """The shard url / sample key webdataset attached to ``exn``, if any."""
        url = getattr(exn, "url", None)
        key = getattr(exn, "key", None)
        if url is None:
            # tar readers append (stream, url) to exn.args.
            for arg in reversed(exn.args[1:]):
                if isinstance(arg, str):
                    url = arg
                    break
        parts = [str(p) for p in (url, key) if p is not None]
        return " ".join(parts) if parts else None

    def __call__(self, exn: BaseException) -> bool:
        if is_code_error(exn):
            exn.add_note("(a code or configuration error, not bad data: not skipped)")
            raise exn
        kind = self.kind(exn)
        self.counts[kind] += 1
        where = self.where(exn)
        first = str(exn.args[0]) if exn.args else str(exn)
        cause = str(exn.__cause__) if exn.__cause__ is not None else ""
        msg = ": ".join(part for part in (first, cause) if part) or "(no message)"
        logger.warning(
            "%s: skipped bad input (%s%s): %s",
            self.name,
            kind,
            f" in {where}" if where else "",
            msg[:500],
        )
        return True

    def __repr__(self) -> str:
        return f"SkipCounter(total={self.total}, counts={dict(self.counts)})"


def expand_urls(spec: str | Path | Iterable[str | Path]) -> list[str]:
    """Shard list from a directory (its ``*.tar``), a brace pattern, a file, or a list of those."""
    if isinstance(spec, (str, Path)):
        specs: list[str | Path] = [spec]
    else:
        specs = list(spec)
    urls: list[str] = []
    for item in specs:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in directory {path}")
            urls.extend(found)
            continue
        text = str(item)
        found = []
        for pattern in braceexpand.braceexpand(text):
            if Path(pattern).is_file():
                found.append(pattern)
            else:
                found.extend(sorted(glob.glob(pattern)))
        if not found:
            raise FileNotFoundError(f"no shards match {text!r}")
        urls.extend(found)
    if not urls:
        raise FileNotFoundError(f"no shards given: {spec!r}")
    return urls


def _to_text(sample: dict[str, Any]) -> str:
    text = sample.get("txt")
    if not isinstance(text, str) or not text:
        exn = MissingTextError(f"sample has no .txt text (members: {sorted(sample)})")
        exn.key = sample.get("__key__")  # type: ignore[attr-defined]
        exn.url = sample.get("__url__")  # type: ignore[attr-defined]
        raise exn
    return text


def _all_shards(src):
    """A node splitter that keeps every shard (each rank reads the same stream)."""
    yield from src


def raw_samples(
    urls: str | Path | Iterable[str | Path],
    *,
    seed: int = 0,
    resample: bool = False,
    shuffle_buffer: int = 0,
    handler: SkipCounter,
    same_on_all_ranks: bool = False,
):
    """Undecoded samples (dicts of member bytes) from shards; see :func:`text_samples`."""
    shard_list = expand_urls(urls)
    if resample:
        pipeline = wds.DataPipeline(
            wds.ResampledShards(shard_list, seed=seed, deterministic=True,
                                **({"worker_seed": lambda: 0} if same_on_all_ranks else {})),
            wds.tarfile_to_samples(handler=handler),
        )
    else:
        pipeline = wds.WebDataset(
            shard_list,
            handler=handler,
            shardshuffle=len(shard_list) if shuffle_buffer > 0 else False,
            nodesplitter=_all_shards if same_on_all_ranks else wds.split_by_node,
            seed=seed,
            empty_check=False,  # a rank/worker may legitimately get no shard; not an error
        )
    if shuffle_buffer > 0:
        pipeline = pipeline.compose(
            wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed)
        )
    return pipeline


def text_samples(
    urls: str | Path | Iterable[str | Path],
    *,
    seed: int = 0,
    resample: bool = False,
    shuffle_buffer: int = 0,
    skips: SkipCounter | None = None,
    same_on_all_ranks: bool = False,
) -> IterableDataset:
    """Stream of ``str`` texts from ``KEY.txt`` members of webdataset shards.

    ``resample=False``: one pass over the shards, split by node (and by DataLoader worker),
    in order unless ``shuffle_buffer > 0`` (then shards and samples are shuffled by ``seed``).
    ``resample=True``: an endless stream drawing shards with replacement, deterministic given
    ``seed`` (and the rank / worker, so each gets its own stream). Samples without text or with
    undecodable text, and unreadable shards, are skipped and counted in ``skips``.
    ``same_on_all_ranks=True`` gives every rank the same stream (no split by rank), which the
    trainer slices by rank so a multi-rank step sees exactly the single-process global batch.
    """
    handler = skips if skips is not None else SkipCounter()
    pipeline = raw_samples(urls, seed=seed, resample=resample, shuffle_buffer=shuffle_buffer,
                           handler=handler, same_on_all_ranks=same_on_all_ranks)
    pipeline = pipeline.compose(wds.decode(only=["txt"], handler=handler))
    return pipeline.compose(wds.map(_to_text, handler=handler))


class MissingImageError(ValueError):
    """An image-text sample without a decodable ``.png`` / ``.jpg`` member."""


IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def _to_image_text(sample: dict, image_size: int) -> dict:
    """Sample (text members decoded, the image still bytes) -> {"key", "image" [3, S, S] in
    [-1, 1], "caption", "meta"}; raises on a missing or undecodable member (the handler counts
    and skips it). The image is decoded here, once, straight to RGB (webdataset's "pil"
    decoder would open, load and convert it through its handler chain first)."""
    import io

    import numpy as np
    from PIL import Image

    key = sample.get("__key__")
    raw = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if not isinstance(raw, bytes):
        raise MissingImageError(f"sample {key!r} has no image")
    text = sample.get("txt")
    if not isinstance(text, str) or not text.strip():
        raise MissingTextError(f"sample {key!r} has no caption")
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return {"key": key, "image": arr / 127.5 - 1.0, "caption": text.strip(),
            "meta": sample.get("json")}


def image_text_samples(
    urls: str | Path | Iterable[str | Path],
    *,
    image_size: int = 32,
    seed: int = 0,
    resample: bool = False,
    shuffle_buffer: int = 0,
    skips: SkipCounter | None = None,
    same_on_all_ranks: bool = False,
) -> IterableDataset:
    """Image-caption pairs (img2dataset layout ``KEY.png|jpg`` + ``KEY.txt`` [+ ``KEY.json``]).

    A corrupt image, a missing caption or image (e.g. a tar cut between the two members) and
    a truncated shard are skipped and counted in ``skips``; the stream goes on.
    """
    from functools import partial

    handler = skips if skips is not None else SkipCounter()
    pipeline = raw_samples(urls, seed=seed, resample=resample, shuffle_buffer=shuffle_buffer,
                           handler=handler, same_on_all_ranks=same_on_all_ranks)
    pipeline = pipeline.compose(wds.decode(only=["txt", "json"], handler=handler))
    return pipeline.compose(wds.map(partial(_to_image_text, image_size=image_size),
                                    handler=handler))


def pack_batches(
    texts: Iterable[str],
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    drop_last: bool = True,
    multiple_of: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Pack tokenized samples greedily into rows of ``seq_len`` and yield batches of rows.

    Each text becomes ``encode_document(tokenizer, text, seq_len)`` samples (a long document
    gives several chunks, each its own sample). A row holds whole samples only; when the next
    sample does not fit, the row is closed and padded. Yields dicts of ``[batch_size, seq_len]``
    LongTensors: ``input_ids`` (pad id on padding), ``sample_ids`` (0, 1, ... per sample in the
    row, -1 on padding) and ``positions`` (index inside the sample, 0 on padding). A final
    partial batch is dropped; a final partial row is emitted if it completes a batch.
    ``multiple_of`` (a VAE's patch size) pads every sample with pad tokens of its own to a
    multiple of that many tokens, so a patch never straddles two samples.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if multiple_of < 1 or seq_len % multiple_of:
        raise ValueError(f"seq_len {seq_len} must be a multiple of multiple_of {multiple_of}")
    pad_id = tokenizer.pad_token_id
    input_ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
    sample_ids = torch.full((batch_size, seq_len), -1, dtype=torch.long)
    positions = torch.zeros((batch_size, seq_len), dtype=torch.long)
    row, col, sid = 0, 0, 0

    def take() -> dict[str, torch.Tensor]:
        nonlocal input_ids, sample_ids, positions
        batch = {"input_ids": input_ids, "sample_ids": sample_ids, "positions": positions}
        input_ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
        sample_ids = torch.full((batch_size, seq_len), -1, dtype=torch.long)
        positions = torch.zeros((batch_size, seq_len), dtype=torch.long)
        return batch

    for text in texts:
        for chunk in encode_document(tokenizer, text, seq_len):
            chunk = chunk + [pad_id] * (-len(chunk) % multiple_of)
            n = len(chunk)
            if col + n > seq_len:  # close this row
                row, col, sid = row + 1, 0, 0
                if row == batch_size:
                    yield take()
                    row = 0
            input_ids[row, col : col + n] = torch.tensor(chunk, dtype=torch.long)
            sample_ids[row, col : col + n] = sid
            positions[row, col : col + n] = torch.arange(n)
            col, sid = col + n, sid + 1
    used = row + 1 if col > 0 else row
    if used == batch_size or (used > 0 and not drop_last):
        yield {k: v[:used] for k, v in take().items()}


def text_batches(
    urls: str | Path | Iterable[str | Path],
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    resample: bool = True,
    skips: SkipCounter | None = None,
    shuffle_buffer: int = 0,
    multiple_of: int = 1,
    same_on_all_ranks: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Packed token batches from text shards: ``pack_batches(text_samples(...))``."""
    texts = text_samples(
        urls, seed=seed, resample=resample, shuffle_buffer=shuffle_buffer, skips=skips,
        same_on_all_ranks=same_on_all_ranks,
    )
    return pack_batches(iter(texts), tokenizer, seq_len=seq_len, batch_size=batch_size,
                        multiple_of=multiple_of)


def mix_streams(streams: dict[str, Iterable], ratios: dict[str, float], *, seed: int = 0
                ) -> Iterator[tuple[str, Any]]:
    """Interleave named streams (e.g. one per task) by ratio: yields (name, sample).

    The choice of stream is drawn from a generator seeded by `seed` only, so every rank that
    uses the same seed follows the same task sequence (ratios synchronized across ranks). A
    finite stream that runs out is dropped and the remaining ratios are renormalized; the mix
    ends when every stream has ended.
    """
    import random

    unknown = set(ratios) - set(streams)
    if unknown:
        raise ValueError(f"ratios name streams that do not exist: {sorted(unknown)}")
    bad = {k: v for k, v in ratios.items() if not v >= 0}
    if bad or not any(v > 0 for v in ratios.values()):
        raise ValueError(f"ratios must be >= 0 with at least one > 0, got {ratios}")
    live = {k: iter(streams[k]) for k, v in ratios.items() if v > 0}
    rng = random.Random(seed)
    while live:
        names = list(live)
        name = rng.choices(names, weights=[ratios[k] for k in names])[0]
        try:
            yield name, next(live[name])
        except StopIteration:
            del live[name]


# --------------------------------------------------------------------------------------------
# task samples: what a task (tasks/) makes of an image-text record, and their batches


@dataclasses.dataclass
class TaskSample:
    """One training sample of a task before encoding: the token ids of its text pieces
    ([bos] ... [eos] each), its images ([3, H, W] in [-1, 1]) and its layout recipe, whose
    SegmentSpec sources index `texts` (text segments) and `images` (image segments)."""

    task: str
    texts: list[list[int]]
    images: list[torch.Tensor]
    recipe: list[SegmentSpec]
    cond_drop: float = 0.0


def pack_pieces(pieces: list[list[int]], seq_len: int, pad_id: int
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pack token-id pieces greedily into rows of seq_len (each piece its own sample).

    Returns the rows ({input_ids, sample_ids, positions} [R, seq_len], as pack_batches) and
    the index [n_pieces, 3] of (row, start, length) of every piece."""
    rows: list[list[list[int]]] = []
    index, col = [], seq_len
    for piece in pieces:
        n = len(piece)
        if not 0 < n <= seq_len:
            raise ValueError(f"a text piece of {n} tokens does not fit rows of {seq_len}")
        if col + n > seq_len:
            rows.append([])
            col = 0
        index.append((len(rows) - 1, col, n))
        rows[-1].append(piece)
        col += n
    r = max(1, len(rows))
    input_ids = torch.full((r, seq_len), pad_id, dtype=torch.long)
    sample_ids = torch.full((r, seq_len), -1, dtype=torch.long)
    positions = torch.zeros((r, seq_len), dtype=torch.long)
    next_sample = [0] * r
    for (row, start, n), piece in zip(index, pieces):
        input_ids[row, start:start + n] = torch.tensor(piece)
        sample_ids[row, start:start + n] = next_sample[row]
        positions[row, start:start + n] = torch.arange(n)
        next_sample[row] += 1
    rows_t = {"input_ids": input_ids, "sample_ids": sample_ids, "positions": positions}
    return rows_t, torch.tensor(index, dtype=torch.long).view(-1, 3)


def collate_task_samples(samples: list[TaskSample], *, seq_len: int, pad_id: int) -> dict:
    """A batch of task samples: every text piece packed into rows (one Text VAE pass for all),
    images stacked, recipes re-indexed to the batch's pieces and images."""
    pieces, images, recipes = [], [], []
    for smp in samples:
        t0, i0 = len(pieces), len(images)
        recipes.append([dataclasses.replace(
            spec, source=spec.source + (i0 if spec.modality == MODALITY_IMAGE else t0))
            for spec in smp.recipe])
        pieces.extend(smp.texts)
        images.extend(smp.images)
    rows, index = pack_pieces(pieces, seq_len, pad_id)
    return {
        "pieces": rows,
        "piece_index": index,
        "images": torch.stack(images) if images else torch.zeros(0),
        "recipes": recipes,
        "cond_drop": [smp.cond_drop for smp in samples],
        "tasks": [smp.task for smp in samples],
    }


def to_device(batch, device: torch.device):
    """Tensors of a (nested) batch moved to `device`; everything else as is."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
