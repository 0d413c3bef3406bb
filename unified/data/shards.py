"""Writing webdataset shards in the img2dataset layout (``KEY.txt`` [+ ``KEY.json``]).

Text inputs (``.txt`` / ``.jsonl`` files) and the built-in stdlib-docstring corpus are turned
into ``{prefix}-000000.tar``, ``{prefix}-000001.tar``, ... shards readable by
:func:`unified.data.streams.text_samples`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds

from unified.data.corpus import is_heldout, iter_default_corpus
from unified.data.streams import SkipCounter

TEXT_SUFFIXES = (".txt", ".jsonl")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


class BadInputLine(ValueError):
    """A ``.jsonl`` line that is not a JSON object with a non-empty ``"text"`` string."""


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    prefix: str,
    max_per_shard: int = 2000,
) -> list[Path]:
    """Write webdataset samples (dicts with ``__key__`` and one entry per member) to
    ``out_dir/PREFIX-000000.tar`` ...; return the non-empty shard paths.

    Keys must be unique and must not contain ``.`` or ``/`` (webdataset splits the sample key
    from the extension at the first dot).
    """
    if max_per_shard < 1:
        raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, int]] = []
    seen: set[str] = set()

    def post(fname: str) -> None:
        written.append((fname, writer.count))

    # a whole-second mtime keeps every member a plain ustar header: a float one (webdataset's
    # default, time.time()) adds a PAX header per member, which doubles the readers' tar
    # parsing (bench/data_loading.py)
    writer = wds.ShardWriter(
        str(out / f"{prefix}-%06d.tar"), maxcount=max_per_shard, post=post, verbose=0,
        mtime=int(time.time()),
    )
    try:
        for sample in samples:
            key = sample["__key__"]
            if not key or "." in key or "/" in key:
                raise ValueError(f"bad sample key {key!r}: must be non-empty, no '.' or '/'")
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}")
            seen.add(key)
            writer.write(sample)
    finally:
        writer.close()
    paths = []
    for fname, count in written:
        if count > 0:
            paths.append(Path(fname))
        else:
            Path(fname).unlink(missing_ok=True)  # ShardWriter opens a first shard eagerly
    return paths


def write_text_shards(
    records: Iterable[tuple[str, str]],
    out_dir: str | Path,
    prefix: str = "text",
    max_per_shard: int = 2000,
) -> list[Path]:
    """Write ``(key, text)`` records as ``KEY.txt`` samples; return the non-empty shard paths."""
    samples = ({"__key__": key, "txt": text} for key, text in records)
    return write_shards(samples, out_dir, prefix, max_per_shard)


def _input_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"text input not found: {path}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no .txt or .jsonl files in directory {path}")
            files.extend(found)
        elif path.suffix in TEXT_SUFFIXES:
            files.append(path)
        else:
            raise ValueError(
                f"unsupported text input {path}: expected one of {', '.join(TEXT_SUFFIXES)}"
            )
    return files


def read_text_inputs(
    paths: str | Path | Iterable[str | Path], skips: SkipCounter | None = None
) -> Iterator[tuple[str, str]]:
    """Yield ``(key, text)`` documents from ``.txt`` / ``.jsonl`` files (or folders of them).

    A ``.txt`` file gives one document per blank-line-separated paragraph; a ``.jsonl`` file one
    per line holding an object with a ``"text"`` string. Bad ``.jsonl`` lines are skipped, logged
    and counted in ``skips``. Missing paths and unsupported types raise before anything is read.
    """
    files = _input_files(paths)
    handler = skips if skips is not None else SkipCounter("text inputs")

    def generate() -> Iterator[tuple[str, str]]:
        stems: set[str] = set()
        for path in files:
            stem = _KEY_UNSAFE.sub("-", path.stem).strip("-_") or "doc"
            base, i = stem, 2
            while stem in stems:
                stem, i = f"{base}-{i}", i + 1
            stems.add(stem)
            with open(path, encoding="utf-8", errors="replace") as f:
                if path.suffix == ".txt":
                    paragraphs = (p.strip() for p in _BLANK_LINE.split(f.read()))
                    docs = (p for p in paragraphs if p)
                    yield from ((f"{stem}__{n:08d}", t) for n, t in enumerate(docs))
                    continue
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        text = obj.get("text") if isinstance(obj, dict) else None
                        if not isinstance(text, str) or not text:
                            raise BadInputLine('no non-empty "text" string')
                    except ValueError as exn:  # json.JSONDecodeError is a ValueError
                        err = BadInputLine(f"{path}:{lineno}: {exn}")
                        err.url = str(path)  # type: ignore[attr-defined]
                        handler(err)
                        continue
                    yield f"{stem}__{lineno:08d}", text

    return generate()


def make_default_corpus_shards(
    out_dir: str | Path,
    max_per_shard: int = 2000,
    records: Iterable[tuple[str, str]] | None = None,
) -> dict[str, int]:
    """Write the default corpus (or `records`) to ``out_dir/train/`` and ``out_dir/heldout/``,
    split by :func:`unified.data.corpus.is_heldout`."""
    out = Path(out_dir)
    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    for key, text in records if records is not None else iter_default_corpus():
        (heldout if is_heldout(key) else train).append((key, text))
    train_shards = write_text_shards(train, out / "train", "text", max_per_shard)
    heldout_shards = write_text_shards(heldout, out / "heldout", "text", max_per_shard)
    return {
        "train_docs": len(train),
        "heldout_docs": len(heldout),
        "train_shards": len(train_shards),
        "heldout_shards": len(heldout_shards),
    }


def write_image_text_shards(
    records: Iterable[tuple[str, object, str, dict]],
    out_dir: str | Path,
    prefix: str = "images",
    max_per_shard: int = 2000,
) -> list[Path]:
    """Write ``(key, image, caption, meta)`` records as ``KEY.png`` + ``KEY.txt`` + ``KEY.json``
    samples (the img2dataset layout read by :func:`unified.data.streams.image_text_samples`).

    ``image`` is a PIL image (saved as PNG, lossless) or ready-made PNG bytes; ``meta`` is any
    JSON-serialisable dict (written with sorted keys).
    """
    import io

    def samples():
        for key, image, text, meta in records:
            if isinstance(image, bytes):
                png = image
            else:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                png = buf.getvalue()
            yield {"__key__": key, "png": png, "txt": text,
                   "json": json.dumps(meta, sort_keys=True).encode("utf-8")}

    return write_shards(samples(), out_dir, prefix, max_per_shard)
