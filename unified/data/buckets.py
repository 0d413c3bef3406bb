"""Aspect-ratio buckets for training (data.buckets): image-text batches of one shape each.

`data.buckets` lists aspect ratios (width / height); each becomes a bucket (height, width) of
about image.size^2 pixels, both sides multiples of the model's image token size (the VAE's
downsampling x the patch size). A training image goes to the bucket nearest its own aspect
ratio (read from the header, EXIF orientation applied, no pixel decoded) and is resized to
cover it and cropped (unified/data/images.py model_input). A global batch is made of one
bucket's samples, in the order the stream fills them, so tensors stack; since every rank and
every DataLoader worker reads the same stream, they form the same batches, and a rank still
decodes only its own slices (unified/training/batches.py). No buckets: one square bucket of
image.size, as without this module.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator

from PIL import Image

from unified.data.streams import TaskSample

Size = tuple[int, int]  # (height, width) in pixels
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def bucket_sizes(ratios: tuple[float, ...] | list[float], size: int, factor: int) -> list[Size]:
    """(height, width) of each aspect ratio (width / height), about size^2 pixels, sides
    multiples of `factor` (duplicates dropped); ValueError naming data.buckets."""
    out: list[Size] = []
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf:
            raise ValueError(f"data.buckets: an aspect ratio (width / height) must be a number "
                             f"> 0, got {r!r}")
        if not 1 / 16 <= r <= 16:
            raise ValueError(f"data.buckets: aspect ratio {r:g} is beyond 1:16 .. 16:1")
        h = max(factor, round(size / math.sqrt(r) / factor) * factor)
        w = max(factor, round(size * math.sqrt(r) / factor) * factor)
        if (h, w) not in out:
            out.append((h, w))
    return out


def nearest(sizes: list[Size], width: int, height: int) -> Size:
    """The bucket whose aspect ratio is nearest (in log ratio) to width / height; ties go
    to the one listed first."""
    want = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[1] / s[0]) - want))


def image_shape(data: bytes) -> tuple[int, int] | None:
    """(width, height) of encoded image bytes as the model will see them (EXIF orientation
    applied), from the header; None when unreadable (its decoding fails later, counted)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if img.getexif().get(0x0112) in _TRANSPOSED:
                w, h = h, w
    except Exception:  # noqa: BLE001 - a bad image is the decoder's to report and count
        return None
    return (w, h) if w > 0 and h > 0 else None


def bucket_of(smp: TaskSample, sizes: list[Size]) -> Size:
    """A sample's bucket: its first image's (a sample without a readable image: the bucket
    nearest to square)."""
    shape = None
    for img in smp.images[:1]:
        if hasattr(img, "data"):  # unified.data.records.ImageRef: undecoded bytes
            shape = image_shape(img.data)
        elif hasattr(img, "shape"):  # an already decoded [3, H, W] tensor
            shape = (int(img.shape[-1]), int(img.shape[-2]))
    return nearest(sizes, *(shape or (1, 1)))


def bucketed(samples: Iterator[TaskSample], n: int, sizes: list[Size]
             ) -> Iterator[tuple[Size, list[TaskSample]]]:
    """Batches of `n` samples of one bucket each, (size, samples), in the order buckets fill
    up (deterministic given the stream); at most n - 1 samples wait per bucket."""
    waiting: dict[Size, list[TaskSample]] = {s: [] for s in sizes}
    for smp in samples:
        size = bucket_of(smp, sizes)
        waiting[size].append(smp)
        if len(waiting[size]) == n:
            yield size, waiting[size]
            waiting[size] = []
