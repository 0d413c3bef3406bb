"""The one place that checks user input: numbers, texts and images from the command line, the
pipeline's arguments and the demo's API, with the same one-line messages everywhere.

Every check raises ValueError with a message meant for the user that names the field:

    whole("steps", 8.5, 1, 64)        -> "steps must be a whole number, got 8.5"
    real("guidance", nan, 0, 20)      -> "guidance must be a finite number, got nan"
    text("prompt", "\\ud800")          -> "the prompt holds an invalid character at position 1: ..."
    open_image("huge.png")            -> "the image is too large (12000 x 12000); ..."

Numbers: a bool is not a number; an integral float (8.0, what a UI sends) counts as a whole
number, a fractional one (8.5) is refused, never rounded; NaN and infinities are refused;
integers of any size are compared exactly (no float overflow). Texts: a lone UTF-16 surrogate
(what invalid UTF-8 on a command line decodes to, or an unpaired "\\ud800" in JSON) is refused.
Images: the size is read from the header and checked before any pixel is decoded.
(The sampler configs in prior/flow.py keep their own checks with the same wording; prior/
imports nothing of the project.)
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import numbers
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from prior.flow import SAMPLERS
from unified.data.images import draft
from unified.generate import MAX_SEED

MAX_PROMPT_CHARS = 2000
MAX_BATCH = 256  # prompts or images in one pipeline call
MAX_IMAGE_SIDE = 4096  # larger images are refused, not resized (memory)
MAX_IMAGE_BYTES = 20 * 2**20  # the demo's upload limit (max_file_size="20mb"), also data: URLs


def show(value: Any, limit: int = 40) -> str:
    """`value` for a message: repr, shortened (a 400-digit integer is not printed whole)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        s = repr(value) if not isinstance(value, float) else f"{value:g}"
    elif abs(int(value)) < 10**limit:
        s = str(int(value))
    else:  # str() of a huge int is slow, and refused beyond 4300 digits
        s = f"a {digits(int(value))}-digit number"
    return s if len(s) <= limit else s[:limit - 3] + "..."


def digits(n: int) -> int:
    """How many decimal digits |n| has (without str(), which refuses huge ints)."""
    n, d = abs(n), int(math.log10(abs(n))) if n else 0
    while d > 0 and 10**d > n:  # log10 of a huge int may be off by one either way
        d -= 1
    while 10 ** (d + 1) <= n:
        d += 1
    return d + 1


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def whole(name: str, value: Any, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi]; an integral float (8.0) is accepted, 8.5 is not."""
    if value is None:
        raise ValueError(f"{name} is missing: give a whole number")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, numbers.Integral):
        n = int(value)
    elif isinstance(value, numbers.Real):
        try:
            f = float(value)
        except (OverflowError, ValueError):
            f = math.nan
        if not math.isfinite(f) or not f.is_integer():
            raise ValueError(f"{name} must be a whole number, got {show(value)}")
        n = int(f)
    else:
        raise ValueError(f"{name} must be a whole number, got {show(value)}")
    if not lo <= n <= hi:
        raise ValueError(f"{name} must be between {_fmt(lo)} and {_fmt(hi)}, got {show(n)}")
    return n


def real(name: str, value: Any, lo: float, hi: float, *, low_open: bool = False) -> float:
    """`value` as a finite float in [lo, hi] ((lo, hi] with `low_open`)."""
    if value is None:
        raise ValueError(f"{name} is missing: give a number")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {show(value)}")
    if not isinstance(value, numbers.Integral):
        try:
            f = float(value)
        except (OverflowError, ValueError):
            f = math.inf
        if not math.isfinite(f):
            raise ValueError(f"{name} must be a finite number, got {show(value)}")
    if (lo < value if low_open else lo <= value) and value <= hi:
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range, with no upper bound
            raise ValueError(f"{name} must be a finite number, got {show(value)}") from None
    if low_open:
        span = f"greater than {_fmt(lo)}" + ("" if math.isinf(hi) else f" and at most {_fmt(hi)}")
        raise ValueError(f"{name} must be {span}, got {show(value)}")
    raise ValueError(f"{name} must be between {_fmt(lo)} and {_fmt(hi)}, got {show(value)}")


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}, got {show(value)}")
    return value


@dataclass(frozen=True)
class Range:
    """The accepted values of a numeric knob: whole numbers or reals in [lo, hi]
    ((lo, hi] with `low_open`)."""

    lo: float
    hi: float
    whole: bool = False
    low_open: bool = False

    def check(self, name: str, value: Any) -> int | float:
        if self.whole:
            return whole(name, value, int(self.lo), int(self.hi))
        return real(name, value, self.lo, self.hi, low_open=self.low_open)


# The pipeline's knobs (UnifiedPipeline and the command line); the demo narrows some of them
# (demo/app.py Limits) to bound a request's cost.
KNOBS: dict[str, Range] = {
    "max_new_tokens": Range(1, 1 << 20, whole=True),
    "steps": Range(1, 1000, whole=True),
    "guidance": Range(0.0, 50.0),
    "shift": Range(0.0, math.inf, low_open=True),
    "temperature": Range(0.0, 10.0),
    "noise_scale": Range(0.0, 10.0),
    "top_k": Range(0, 1 << 30, whole=True),
    "top_p": Range(0.0, 1.0, low_open=True),
    "seed": Range(0, MAX_SEED, whole=True),
    "trajectory": Range(0, 1000, whole=True),
    "rerank": Range(0, 64, whole=True),
}


def knobs(**values: Any) -> dict[str, Any]:
    """Check the named knobs against KNOBS (and `method` against the samplers); returns them
    with whole numbers as ints. The first bad one raises its message."""
    out = {}
    for name, value in values.items():
        out[name] = choice("sampler", value, SAMPLERS) if name == "method" else \
            KNOBS[name].check(name, value)
    return out


def text(what: str, value: Any, *, allow_empty: bool = False,
         max_chars: int = MAX_PROMPT_CHARS) -> str:
    """A prompt-like text: a str, at most `max_chars` characters, valid Unicode (no lone
    surrogate), not blank unless `allow_empty`."""
    if not isinstance(value, str):
        raise ValueError(f"the {what} must be text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise ValueError(f"the {what} is too long: {len(value)} characters, at most {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"the {what} holds an invalid character at position {e.start + 1}: "
            f"U+{ord(value[e.start]):04X} is a lone surrogate (text that is not valid UTF-8, "
            "or an unpaired UTF-16 surrogate)") from None
    if not allow_empty and not value.strip():
        raise ValueError(f"the {what} is empty")
    return value


def texts(what: str, value: Any) -> list[str]:
    """One prompt or a list of them, each checked by `text`."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"the {what} must be text or a list of texts, got {type(value).__name__}")
    batch(f"{what}s", len(items))
    return [text(what, v) for v in items]


def batch(what: str, n: int) -> int:
    if n < 1:
        raise ValueError(f"no {what} given")
    if n > MAX_BATCH:
        raise ValueError(f"too many {what}: {n}, at most {MAX_BATCH} in one call")
    return n


# --------------------------------------------------------------------------- image sizes
MAX_GENERATION_SCALE = 4  # a generated image: at most this many times the training size a side


def image_size(height: Any, width: Any, *, factor: int, size: int,
               names: tuple[str, str] = ("height", "width")) -> tuple[int, int]:
    """The (height, width) in pixels of an image to generate: None = the model's training
    `size`; otherwise a whole number that is a positive multiple of `factor` (the image VAE's
    downsampling x the patch size: one image token a side) and at most
    MAX_GENERATION_SCALE x size (and MAX_IMAGE_SIDE). ValueError naming the field."""
    hi = min(MAX_IMAGE_SIDE, MAX_GENERATION_SCALE * size) // factor * factor
    out = []
    for name, value in zip(names, (height, width)):
        if value is None:
            out.append(size)
            continue
        n = whole(name, value, -(1 << 62), 1 << 62)
        if n < 1 or n % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor} pixels (the image "
                             f"VAE's downsampling x the patch size), got {show(n)}")
        if n > hi:
            raise ValueError(f"{name} must be at most {hi} pixels ({MAX_GENERATION_SCALE} x this "
                             f"model's training size of {size}), got {show(n)}")
        out.append(n)
    return out[0], out[1]


_SIZE = re.compile(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*")


def size_text(name: str, value: Any) -> tuple[int, int] | None:
    """An OpenAI-style image size "WIDTHxHEIGHT" (e.g. "512x256") as (height, width);
    None for None or "auto" (the model's size). The numbers are checked by `image_size`."""
    if value is None or value == "auto":
        return None
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{name} must look like WIDTHxHEIGHT in pixels (e.g. 256x256) or "
                         f"auto, got {show(value)}")
    return int(m[2]), int(m[1])


# --------------------------------------------------------------------------- images
def check_image_size(w: int, h: int) -> None:
    if max(w, h) > MAX_IMAGE_SIDE:
        raise ValueError(f"the image is too large ({w} x {h}); at most {MAX_IMAGE_SIDE} pixels "
                         f"a side")
    if min(w, h) < 1:
        raise ValueError("the image is empty")


def _open(fp, name: str, size: int | None = None) -> Image.Image:
    """Open (header only), check the size, then decode (a JPEG at the reduced scale training
    decodes it at for `size`: unified.data.images.draft); every failure is a ValueError."""
    try:
        with warnings.catch_warnings():  # the size check below refuses huge images anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except Image.DecompressionBombError as e:  # over 2x PIL's own pixel limit
        size = re.search(r"\((\d+) pixels\)", str(e))
        raise ValueError(f"the image is too large ({size[1] + ' pixels' if size else name}); "
                         f"at most {MAX_IMAGE_SIDE} pixels a side") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure is the user's file
        raise ValueError(f"not a readable image: {name} ({type(e).__name__}: {e})") from None
    check_image_size(*image.size)
    try:
        draft(image, size).load()
    except Exception as e:  # noqa: BLE001 - e.g. a truncated file
        raise ValueError(f"not a readable image: {name} ({type(e).__name__}: {e})") from None
    return image


def open_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Read an image file; ValueError (one readable line) for a missing, unreadable or too
    large file. The size is checked from the header, before the pixels are decoded; `size`:
    the side the model will see (a JPEG is then decoded as training decodes it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such image file: {path}")
    return _open(path, path.name, size)


def open_image_bytes(data: bytes, name: str = "the image") -> Image.Image:
    """An image from encoded bytes (a PNG, JPEG, ... file's content), checked as open_image."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{name} is too large: {len(data)} bytes, at most "
                         f"{MAX_IMAGE_BYTES // 2**20} MB")
    return _open(io.BytesIO(data), name)


def image_from_data_url(url: str) -> Image.Image:
    """The image of a `data:[type];base64,...` URL; its length is bounded before decoding
    base64 and its pixel size is read from the header before decoding pixels."""
    head, sep, payload = url.partition(",")
    if not head.startswith("data:") or not sep or not head.endswith(";base64"):
        raise ValueError("not a readable image: a data: URL image must be "
                         "data:image/...;base64,<data>")
    if len(payload) > (MAX_IMAGE_BYTES + 2) // 3 * 4 + 4:
        raise ValueError(f"the data: URL image is too large: about {len(payload) * 3 // 4} "
                         f"bytes, at most {MAX_IMAGE_BYTES // 2**20} MB")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a readable image: the data: URL is not valid base64") from None
    return open_image_bytes(data, "the data: URL image")
