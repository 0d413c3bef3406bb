"""Webdataset pipelines: shard lists, robust sample reading (text, image-text), text packing.

Shards use the img2dataset layout (``KEY.txt`` + optional ``KEY.json``). A bad sample or a
truncated tar never stops a stream: the error goes to a :class:`SkipCounter`, which logs a
warning and counts it, and reading continues with the next sample or shard.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import re
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


class DataError(ValueError):
    """A stream that yields nothing usable: too many bad samples in a row."""


class SkipCounter:
    """Webdataset error handler that logs, counts per kind, and continues.

    Pass an instance as ``handler=`` to webdataset stages. ``counts`` maps a kind (the
    exception class name, with the cause for wrapped decoding errors) to how often it was
    skipped; ``total`` is the sum. A code or config error (``CODE_ERRORS``) is not bad data:
    it is raised, not counted. ``fixed`` counts samples kept after a repair (a caption
    truncated, unreadable metadata dropped: ``note(kind)``). With ``limit`` > 0, ``limit``
    skips in a row (no ``ok()`` from the consumer in between) raise :class:`DataError`
    naming the shard, the sample and the cause: a stream where nothing is usable stops
    instead of looping forever. Warnings are logged for the first few skips of a kind, then
    at 10, 100, 1000, ... of it.
    """

    LOGGED = 5  # warnings per kind before only every power of ten is logged

    def __init__(self, name: str = "data", limit: int = 0) -> None:
        self.name, self.limit = name, limit
        self.counts: Counter[str] = Counter()
        self.fixed: Counter[str] = Counter()
        self.in_a_row = 0

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
        if isinstance(exn, DataError):  # the limit was reached further down the pipeline
            raise exn
        kind = self.kind(exn)
        self.counts[kind] += 1
        self.in_a_row += 1
        where = self.where(exn)
        first = str(exn.args[0]) if exn.args else str(exn)
        cause = str(exn.__cause__) if exn.__cause__ is not None else ""
        msg = ": ".join(part for part in (first, cause) if part) or "(no message)"
        where_msg = f" in {where}" if where else ""
        n = self.counts[kind]
        if n <= self.LOGGED or str(n).strip("0") == "1":
            logger.warning("%s: skipped bad input (%s%s): %s%s", self.name, kind, where_msg,
                           msg[:500], f" ({n} of this kind so far)" if n > self.LOGGED else "")
        if self.limit and self.in_a_row >= self.limit:
            raise DataError(f"{self.name}: {self.in_a_row} samples in a row were unusable; the "
                            f"last one{where_msg}: {kind}: {msg[:300]}. Stopping: fix or "
                            f"drop these shards (skipped so far: {dict(self.counts)})")
        return True

    def ok(self) -> None:
        """The consumer got a usable sample: the run of bad ones is over."""
        self.in_a_row = 0

    def note(self, kind: str, detail: str = "") -> None:
        """Count a sample kept after a repair (logged like a skip, never stops a stream)."""
        self.fixed[kind] += 1
        n = self.fixed[kind]
        if n <= self.LOGGED or str(n).strip("0") == "1":
            logger.warning("%s: %s%s%s", self.name, kind, f": {detail}" if detail else "",
                           f" ({n} so far)" if n > self.LOGGED else "")

    def merge(self, counts: dict[str, int], fixed: dict[str, int]) -> None:
        """Add counts reported by another process (a DataLoader worker)."""
        self.counts.update(counts)
        self.fixed.update(fixed)

    def __repr__(self) -> str:
        return f"SkipCounter(total={self.total}, counts={dict(self.counts)})"


URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, http(s)://, s3://, gs://, ...

Spec = str | Path | Iterable[str | Path] | dict[str, float]


def is_url(text: str) -> bool:
    """A shard address webdataset opens itself (pipe:, http(s)://, s3://, ...), as opposed to
    a local path (a Windows drive letter is a path: schemes here are 2+ characters)."""
    return bool(URL_SCHEME.match(text))


def expand_urls(spec: Spec) -> list[str]:
    """Shard list from a directory (its ``*.tar``), a brace pattern, a file, a URL that
    webdataset reads (``pipe:cmd``, ``http(s)://``, ... brace patterns expanded, not checked
    here: webdataset reports what it cannot open, and the stream skips it), a list of those,
    or a dict {source: ratio} (all its shards; raw_samples mixes the sources by ratio)."""
    if isinstance(spec, dict):
        return [u for source in spec for u in expand_urls(source)]
    if isinstance(spec, (str, Path)):
        specs: list[str | Path] = [spec]
    else:
        specs = list(spec)
    urls: list[str] = []
    for item in specs:
        text = str(item)
        if is_url(text):
            urls.extend(braceexpand.braceexpand(text))
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in directory {path}")
            urls.extend(found)
            continue
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
    urls: Spec,
    *,
    seed: int = 0,
    resample: bool = False,
    shuffle_buffer: int = 0,
    handler: SkipCounter,
    same_on_all_ranks: bool = False,
):
    """Undecoded samples (dicts of member bytes) from shards; see :func:`text_samples`.
    ``urls`` may be a dict {source: ratio}: each source is read as its own stream (seeded
    apart) and every sample drawn from a source chosen by ratio (deterministic given
    ``seed``, so every rank that reads ``same_on_all_ranks`` draws the same sequence)."""
    if isinstance(urls, dict):
        streams = {str(src): raw_samples(src, seed=seed + 1 + i, resample=resample,
                                         handler=handler, same_on_all_ranks=same_on_all_ranks)
                   for i, src in enumerate(urls)}
        ratios = {str(src): float(r) for src, r in urls.items()}
        pipeline = wds.DataPipeline(_Mixed(streams, ratios, seed))
        if shuffle_buffer > 0:
            pipeline = pipeline.compose(
                wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
        return pipeline
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


class _Mixed(IterableDataset):
    """Samples of several streams interleaved by ratio (see mix_streams)."""

    def __init__(self, streams: dict, ratios: dict[str, float], seed: int) -> None:
        self.streams, self.ratios, self.seed = streams, ratios, seed

    def __iter__(self):
        return (smp for _, smp in mix_streams(self.streams, self.ratios, seed=self.seed))


def text_samples(
    urls: Spec,
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

    def to_text(sample: dict) -> str:
        text = _to_text(sample)
        handler.ok()
        return text

    return pipeline.compose(wds.map(to_text, handler=handler))


def image_text_samples(urls: Spec, *, image_size: int = 32, **kwargs) -> IterableDataset:
    """Image-caption pairs with decoded images: see unified.data.records.image_text_samples."""
    from unified.data.records import image_text_samples as samples

    return samples(urls, image_size=image_size, **kwargs)


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
    urls: Spec,
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
    images: list  # tensors, or unified.data.records.ImageRef until the trainer decodes them
    recipe: list[SegmentSpec]
    cond_drop: float = 0.0
    seed: int | None = None  # its own random stream in training (set by the trainer)
    valid: bool = True  # False: a placeholder (its image did not decode), no loss


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
        "valid": [smp.valid for smp in samples],
        "seeds": ([smp.seed for smp in samples]
                  if samples and all(smp.seed is not None for smp in samples) else None),
    }


def to_device(batch, device: torch.device):
    """Tensors of a (nested) batch moved to `device`; everything else as is."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
