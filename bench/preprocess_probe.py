"""Probe images for the image preprocessing, and a picture of what the model sees.

    python -m bench.preprocess_probe --out docs/preprocessing.png --size 128

Writes one row per probe (a square, a 4:1 panorama, a portrait photo stored landscape with an
EXIF rotation, an RGBA image with a transparent background, a 16-bit grayscale gradient, a
palette image with a transparent index): the input as an image viewer shows it (its stored
pixels, scaled to fit), what the reader made of it before (a plain RGB convert and a square
resize: squashed, EXIF ignored, transparency black, 16-bit white), then what `unified.data.images`
makes of it for the model (evaluation: center crop; training: two random crops, the second
with flipping on, which mirrors half of the samples). tests/test_images.py checks the same
probes numerically.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from unified.data.images import load_image, model_input


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def square(n: int = 256) -> Image.Image:
    img = Image.new("RGB", (n, n), (235, 235, 220))
    d = ImageDraw.Draw(img)
    d.ellipse([n // 4, n // 4, 3 * n // 4, 3 * n // 4], fill=(200, 30, 30))
    return img


def panorama(h: int = 128) -> Image.Image:
    """4:1 with a circle in the middle: a squashing resize would make it an ellipse."""
    w = 4 * h
    img = Image.new("RGB", (w, h), (40, 90, 160))
    d = ImageDraw.Draw(img)
    r = h // 3
    d.ellipse([w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r], fill=(250, 210, 40))
    d.rectangle([0, 0, w // 8, h], fill=(30, 140, 60))  # left edge: cut by the center crop
    return img


def exif_portrait(w: int = 256, h: int = 128) -> bytes:
    """Stored landscape (red left half, blue right half) with EXIF orientation 6 (rotate 90
    degrees clockwise to display): shown as a portrait, red on top."""
    img = Image.new("RGB", (w, h), (30, 60, 210))
    ImageDraw.Draw(img).rectangle([0, 0, w // 2 - 1, h], fill=(210, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _bytes(img, "JPEG", exif=exif, quality=95)


def rgba(n: int = 192) -> bytes:
    """A transparent background with an opaque black square (and a half-transparent bar)."""
    img = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rectangle([n // 4, n // 4, 3 * n // 4, 3 * n // 4], fill=(0, 0, 0, 255))
    d.rectangle([0, n - n // 8, n, n], fill=(200, 0, 0, 128))
    return _bytes(img, "PNG")


def gray16(n: int = 160) -> bytes:
    """16-bit grayscale: a horizontal ramp over the full 0..65535 range."""
    ramp = np.linspace(0, 65535, n).round().astype(np.uint16)
    return _bytes(Image.fromarray(np.tile(ramp, (n, 1))), "PNG")


def palette(n: int = 128) -> bytes:
    """A palette ("P") image whose index 0 is transparent."""
    img = Image.new("P", (n, n), 0)
    img.putpalette([0, 0, 0, 255, 140, 0] + [0] * 762)
    ImageDraw.Draw(img).ellipse([n // 4, n // 4, 3 * n // 4, 3 * n // 4], fill=1)
    return _bytes(img, "PNG", transparency=0)


def probes() -> dict[str, bytes]:
    """name -> encoded image bytes, as they would sit in a shard."""
    return {"square": _bytes(square(), "JPEG", quality=95),
            "4:1 panorama": _bytes(panorama(), "PNG"),
            "EXIF-rotated portrait": exif_portrait(),
            "RGBA, transparent": rgba(),
            "16-bit grayscale": gray16(),
            "palette + transparency": palette()}


def _to_pil(x) -> Image.Image:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def _stored(raw: bytes, cell: int) -> Image.Image:
    """The stored pixels (no EXIF rotation, alpha over a checkerboard), fitted into a cell."""
    img = Image.open(io.BytesIO(raw))
    img.load()
    if img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(arr.round().astype(np.uint8))
    img = img.convert("RGBA")
    board = Image.new("RGBA", img.size, (255, 255, 255, 255))
    d = ImageDraw.Draw(board)
    step = 12
    for y in range(0, img.size[1], step):
        for x in range((y // step) % 2 * step, img.size[0], 2 * step):
            d.rectangle([x, y, x + step - 1, y + step - 1], fill=(200, 200, 200, 255))
    img = Image.alpha_composite(board, img).convert("RGB")
    img.thumbnail((2 * cell, cell))
    return img


def _squashed(raw: bytes, size: int) -> Image.Image:
    """What the reader did before unified.data.images: convert("RGB") and a square resize."""
    return Image.open(io.BytesIO(raw)).convert("RGB").resize((size, size), Image.BICUBIC)


def picture(size: int = 128) -> Image.Image:
    pad, label = 8, 22
    cols = [2 * size, size, size, size, size]
    heads = ["input (stored pixels)", "before: squashed", "model: eval", "train crop",
             "train crop, flip on"]
    rows = probes()
    w = sum(cols) + pad * (len(cols) + 1)
    h = label + len(rows) * (size + label + pad) + pad
    out = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(out)
    x = pad
    for c, head in zip(cols, heads):
        d.text((x, 4), head, fill=(0, 0, 0))
        x += c + pad
    y = label
    for i, (name, raw) in enumerate(rows.items()):
        d.text((pad, y), name, fill=(0, 0, 0))
        y += label - 8
        img = load_image(raw, size)
        views = [model_input(img, size), model_input(img, size, train=True, seed=3 + i),
                 model_input(img, size, train=True, seed=11 + i, flip=True)]
        tiles = [_stored(raw, size), _squashed(raw, size), *map(_to_pil, views)]
        x = pad
        for c, tile in zip(cols, tiles):
            out.paste(tile, (x, y))
            x += c + pad
        y += size + pad
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/preprocessing.png")
    ap.add_argument("--size", type=int, default=128, help="model input side in pixels")
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    picture(args.size).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
