"""Image-text records of webdataset shards (img2dataset layout: ``KEY.jpg|png|webp`` +
``KEY.txt`` and/or ``KEY.json``), their images left undecoded until someone needs them.

Every training rank reads the same records (the trainer cuts each global batch into slices)
but decodes only the images of its own slices: a record holds its image as an
:class:`ImageRef` (the bytes), decoded by whoever trains on it with ``ImageRef.decode``
(unified/data/images.py: EXIF orientation, alpha onto white, 16-bit, shorter-side resize + crop).

The caption is the ``.txt`` member, or with ``caption_key`` that key of the ``.json`` (for
shards written without a caption column, e.g. ``caption_key = "caption"``). Unreadable
``.json`` metadata is dropped (counted) when the caption does not come from it; a sample
without image or caption is skipped and counted (SkipCounter), naming the shard and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from unified.data.images import load_image, model_input
from unified.data.streams import MissingTextError, SkipCounter, Spec, is_code_error, raw_samples

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class MissingImageError(ValueError):
    """An image-text sample without an image member."""


class ImageDecodeError(ValueError):
    """An image member that does not decode."""


class BadMetadataError(ValueError):
    """A ``.json`` member that is not a JSON object (when the caption comes from it)."""


def _tagged(exn: Exception, key, url) -> Exception:
    exn.key, exn.url = key, url  # type: ignore[attr-defined]  # SkipCounter.where names them
    return exn


@dataclass(frozen=True)
class ImageRef:
    """An undecoded image: its bytes and where they came from."""

    data: bytes
    key: str | None = None
    url: str | None = None

    def decode(self, size: int | tuple[int, int], *, train: bool = False, seed: int = 0,
               flip: bool = False) -> torch.Tensor:
        """[3, size, size] (or [3, height, width] for a (height, width) bucket) in [-1, 1]
        (unified.data.images.model_input); ImageDecodeError (naming the sample) when the bytes
        are not a readable image."""
        try:
            side = size if isinstance(size, int) else max(size)  # JPEG draft: covers both
            return model_input(load_image(self.data, side), size, train=train, seed=seed,
                               flip=flip)
        except Exception as e:  # noqa: BLE001 - a decoder failure is this sample's fault,
            if is_code_error(e):  # a bug or a bad setting is not: raised, never counted
                raise
            raise _tagged(ImageDecodeError(f"cannot decode the image: {type(e).__name__}: {e}"),
                          self.key, self.url) from None


def _metadata(raw) -> dict:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    meta = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    return meta


def to_record(sample: dict, caption_key: str = "", skips: SkipCounter | None = None) -> dict:
    """Raw sample (member bytes) -> {"key", "url", "image": ImageRef, "caption", "meta"};
    raises (for the handler to count) when the image or the caption is missing."""
    key, url = sample.get("__key__"), sample.get("__url__")
    raw = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if not isinstance(raw, bytes) or not raw:
        raise _tagged(MissingImageError(f"sample has no image (members: {_members(sample)})"),
                      key, url)
    meta = None
    if "json" in sample:
        try:
            meta = _metadata(sample["json"])
        except (ValueError, UnicodeDecodeError) as e:
            if caption_key:
                raise _tagged(BadMetadataError(f"unreadable .json metadata ({e}); the caption "
                                               f"comes from its key {caption_key!r}"),
                              key, url) from None
            if skips is not None:
                skips.note("unreadable .json metadata ignored", f"{url} {key}: {e}")
    if caption_key:
        text = (meta or {}).get(caption_key)
        if not isinstance(text, str) or not text.strip():
            keys = sorted(meta) if meta else "no .json member"
            raise _tagged(MissingTextError(f"no caption under the .json key {caption_key!r} "
                                           f"(its keys: {keys})"), key, url)
    else:
        text = sample.get("txt")
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(text, str) or not text.strip():
            hint = ""
            if meta and any(isinstance(v, str) and v.strip() for v in meta.values()):
                hint = (f"; if the captions are in the .json, set data.caption_key to its key "
                        f"(keys: {sorted(meta)})")
            raise _tagged(MissingTextError(f"sample has no .txt caption (members: "
                                           f"{_members(sample)}){hint}"), key, url)
    return {"key": key, "url": url, "image": ImageRef(raw, key, url),
            "caption": " ".join(text.split()), "meta": meta}


def _members(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def image_text_records(urls: Spec, *, seed: int = 0, resample: bool = False,
                       shuffle_buffer: int = 0, skips: SkipCounter | None = None,
                       same_on_all_ranks: bool = False, caption_key: str = ""
                       ) -> IterableDataset:
    """Records with undecoded images (see the module docstring). A missing image or caption,
    a non-UTF-8 caption and a truncated shard are skipped and counted in ``skips``."""
    handler = skips if skips is not None else SkipCounter()
    pipeline = raw_samples(urls, seed=seed, resample=resample, shuffle_buffer=shuffle_buffer,
                           handler=handler, same_on_all_ranks=same_on_all_ranks)
    return pipeline.compose(wds.map(partial(to_record, caption_key=caption_key, skips=handler),
                                    handler=handler))


def image_text_samples(urls: Spec, *, image_size: int = 32, seed: int = 0,
                       resample: bool = False, shuffle_buffer: int = 0,
                       skips: SkipCounter | None = None, same_on_all_ranks: bool = False,
                       caption_key: str = "") -> IterableDataset:
    """Image-caption pairs with the image decoded: {"key", "image" [3, S, S] in [-1, 1]
    (shorter side resized to S, center crop), "caption", "meta"}. Bad samples (also an
    undecodable image) are skipped and counted in ``skips``; the stream goes on."""
    handler = skips if skips is not None else SkipCounter()

    def decoded(rec: dict) -> dict:
        rec = {**rec, "image": rec["image"].decode(image_size)}
        handler.ok()
        return rec

    records = image_text_records(urls, seed=seed, resample=resample,
                                 shuffle_buffer=shuffle_buffer, skips=handler,
                                 same_on_all_ranks=same_on_all_ranks, caption_key=caption_key)
    return records.compose(wds.map(decoded, handler=handler))
