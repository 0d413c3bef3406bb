"""Image preprocessing: one function from image bytes (or a PIL image) to what the model sees,
used by the training reader and by the pipeline (unified/apps/pipeline.py prepare_image).

    x = model_input(load_image(raw_bytes), 256)                       # eval: center crop
    x = model_input(load_image(raw_bytes, 256), 256, train=True, seed=s, flip=True)

`load_image` decodes and normalizes the mode: the EXIF orientation applied, transparency
composited onto white, 16-bit and 32-bit grayscale scaled (not clipped) to 8 bits, palette and
other modes converted to RGB. `model_input` (torchvision transforms.v2 functional ops)
resizes the shorter side to `size` and crops a square: the center for evaluation and
generation, a random square for training (drawn from `seed`, so a sample's crop does not
depend on which process decodes it), optionally flipped; the result is a [3, size, size]
float tensor in [-1, 1].
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

WHITE = (255, 255, 255)


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") grayscale image as "L",
    scaled by its bit depth (a plain convert() would clip everything above 255 to white)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif img.mode == "F":
        finite = arr[np.isfinite(arr)]
        top = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if top <= 1.0 else 1.0
    else:  # "I": 8-bit data stored in 32 bits, 16-bit data, or wider
        top = int(arr.max()) if arr.size else 0
        scale = 1.0 if top <= 255 else 255.0 / 65535.0 if top <= 65535 else 255.0 / top
    out = np.nan_to_num(arr.astype(np.float64) * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))  # "L"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as RGB: EXIF orientation applied, alpha composited onto white, 16-bit
    grayscale scaled to 8 bits, palette / CMYK / grayscale converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _gray_to_8bit(img)
    if img.mode == "P":  # palette: may carry a transparent index
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:  # a transparent color
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, WHITE)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(data: bytes | Image.Image, size: int | None = None) -> Image.Image:
    """Decode image bytes (or take a PIL image) and return it as RGB (`to_rgb`). With `size`,
    a JPEG is decoded at the smallest DCT scale whose shorter side is still >= size (much
    faster for large photos; the result is resized to size anyway)."""
    if isinstance(data, Image.Image):
        return to_rgb(data)
    with warnings.catch_warnings():  # sizes are checked by the caller where it matters
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = draft(Image.open(io.BytesIO(data)), size)
        img.load()
    return to_rgb(img)


def draft(img: Image.Image, size: int | None) -> Image.Image:
    """An opened, not yet loaded JPEG set to decode at the smallest DCT scale (1/2, 1/4,
    1/8) whose shorter side is still >= size; other images as they are."""
    if size and img.format == "JPEG":
        w, h = img.size
        short = min(w, h)
        img.draft("RGB", (max(1, w * size // short), max(1, h * size // short)))
    return img


def model_input(img: Image.Image, size: int | tuple[int, int], *, train: bool = False,
                seed: int = 0, flip: bool = False) -> torch.Tensor:
    """RGB image -> [3, size, size] float in [-1, 1]: shorter side resized to `size`
    (bicubic, antialiased), then a square crop: centered, or with `train` at a random
    offset drawn from `seed`, and then mirrored with probability 1/2 when `flip`. `size`
    (height, width) (an aspect-ratio bucket, unified/data/buckets.py): resized to the
    smallest size that covers it, then cropped the same way to [3, height, width]."""
    if img.mode != "RGB":
        img = to_rgb(img)
    th, tw = (size, size) if isinstance(size, int) else size
    w, h = img.size
    if th == tw and min(w, h) != th:
        img = TF.resize(img, [th], interpolation=InterpolationMode.BICUBIC, antialias=True)
    elif th != tw:  # cover (height, width): the side that binds gets exactly its length
        scale = max(th / h, tw / w)
        cover = [max(th, round(h * scale)), max(tw, round(w * scale))]
        if cover != [h, w]:
            img = TF.resize(img, cover, interpolation=InterpolationMode.BICUBIC, antialias=True)
    w, h = img.size
    rng = random.Random(seed)
    if train:
        top, left = rng.randint(0, h - th), rng.randint(0, w - tw)
    else:
        top, left = (h - th) // 2, (w - tw) // 2
    img = TF.crop(img, top, left, th, tw)
    if train and flip and rng.random() < 0.5:
        img = TF.horizontal_flip(img)
    # to [-1, 1] in numpy: torch's intra-op threads cost more than they give on one image
    # (10x slower on a busy 2-core machine), and a DataLoader worker has one anyway
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * np.float32(1 / 127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
