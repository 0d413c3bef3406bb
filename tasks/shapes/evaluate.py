"""Shapes world evaluator: read an image back into its objects, and score captions and images.

See :mod:`tasks.shapes.world` for the world. :func:`analyse_image` recovers a :class:`Scene` from an
image: per grid cell, a soft foreground map (the brightest channel ramped around 0.5), presence
from the foreground mass, colour by a foreground-weighted vote of the nearest palette direction
(cosine, so a darkened or blurred edge keeps its hue), and shape + size jointly by the best soft
IoU against the eight (shape, size) templates, each also blurred and shifted by up to
``max_shift`` pixels. It is exact on rendered scenes and tolerant to noise, blur and 1-pixel
offsets, as in generated images. :func:`score_caption` (image-to-text) and :func:`score_image`
(text-to-image) return ``exact`` plus per-attribute accuracies; :func:`mean_scores` averages.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from tasks.shapes.world import (
    ATTRIBUTES,
    COLORS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    extract_objects,
    grid_geometry,
    parse_caption,
    shape_mask,
)

# ----------------------------------------------------------------------------- image analysis

_PALETTE_DIRS = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)
_PALETTE_DIRS /= np.linalg.norm(_PALETTE_DIRS, axis=1, keepdims=True)
# Soft foreground: brightest channel ramped linearly from 0 at FG_LOW to 1 at FG_HIGH.
FG_LOW, FG_HIGH = 0.35, 0.65


def to_float_image(
    img: Image.Image | np.ndarray, image_size: int = 32, value_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """Any image -> ``(S, S, 3)`` float64 in [0, 1].

    PIL images are converted to RGB and resized (bicubic) to ``image_size`` if needed. Arrays
    may be HWC or CHW (3 leading channels), uint8 (0..255) or float in ``value_range`` (e.g.
    ``(-1, 1)`` for a model's output); anything array-like (a CPU tensor) goes through
    ``np.asarray``. Values are clipped to [0, 1].
    """
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        return np.asarray(img, dtype=np.float64) / 255.0
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float64) / 255.0
    else:
        lo, hi = value_range
        out = (arr.astype(np.float64) - lo) / (hi - lo)
    out = np.clip(out, 0.0, 1.0)
    if out.shape[:2] != (image_size, image_size):
        pil = Image.fromarray((out * 255.0 + 0.5).astype(np.uint8), mode="RGB")
        return to_float_image(pil, image_size)
    return out


def _ramp(m: np.ndarray) -> np.ndarray:
    """Soft foreground from the brightest channel: 0 below FG_LOW, 1 above FG_HIGH, linear between."""
    return np.clip((m - FG_LOW) / (FG_HIGH - FG_LOW), 0.0, 1.0)


def _gaussian_blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array, zero (background) outside."""
    if sigma <= 0:
        return plane
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    h, w = plane.shape
    padded = np.pad(plane, radius)
    rows = sum(k[i] * padded[:, i : i + w] for i in range(k.size))
    return sum(k[i] * rows[i : i + h, :] for i in range(k.size))


@cache
def _templates(image_size: int, max_shift: int, blurs: tuple[float, ...]) -> dict[str, Any]:
    """Per cell, every (shape, size, blur, shift) template cut to the cell window, flattened.

    A template is what the soft foreground of a rendered object looks like: the shape mask
    drawn at the cell centre plus a shift, Gaussian-blurred by sigma (the blurred edge of a
    pure palette colour on black is exactly the blurred mask in its brightest channel), then
    ramped like the image (:func:`_ramp`). Returns ``labels`` [(shape, size)] per row and
    ``masks`` {cell: (K, h*w)}. Sharp, unshifted templates come first, so exact ties prefer them.
    """
    geo = grid_geometry(image_size)
    shifts = sorted(
        itertools.product(range(-max_shift, max_shift + 1), repeat=2), key=lambda s: abs(s[0]) + abs(s[1])
    )
    kinds = [(shape, size) for shape in SHAPES for size in SIZES]
    labels = [kind for _ in blurs for _ in shifts for kind in kinds]
    masks = {}
    for cell in range(len(POSITIONS)):
        row, col = divmod(cell, 3)
        (y0, y1), (x0, x1) = geo["bounds"][row], geo["bounds"][col]
        rows = []
        for sigma in blurs:
            for sy, sx in shifts:
                for shape, size in kinds:
                    r = geo["radius"][size]
                    canvas = np.zeros((image_size, image_size), dtype=np.float64)
                    cy, cx = geo["centers"][row] + sy, geo["centers"][col] + sx
                    m = shape_mask(shape, r)
                    ya, yb, xa, xb = cy - r, cy + r + 1, cx - r, cx + r + 1
                    cya, cxa = max(ya, 0), max(xa, 0)
                    cyb, cxb = min(yb, image_size), min(xb, image_size)
                    canvas[cya:cyb, cxa:cxb] = m[cya - ya : cyb - ya, cxa - xa : cxb - xa]
                    soft = _ramp(_gaussian_blur(canvas, sigma)) if sigma > 0 else canvas
                    rows.append(soft[y0:y1, x0:x1].ravel())
        masks[cell] = np.stack(rows)
    return {"labels": labels, "masks": masks}


#: Blur levels (Gaussian sigma, pixels at 32 x 32 scale) of the template family: generated
#: images are often soft, and a blurred shape is compared with blurred templates.
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.5, 0.8, 1.1)
#: A cell whose best template match is below this soft IoU holds no object (e.g. the sliver of
#: a neighbour spilling over the cell edge, or scattered noise).
MIN_IOU = 0.3


def _blurs_for(image_size: int) -> tuple[float, ...]:
    return tuple(round(s * image_size / 32, 3) for s in TEMPLATE_BLURS)


def min_object_area(image_size: int = 32) -> float:
    """Foreground mass (pixels) a cell needs to count as holding an object: half the lightest
    template (the most blurred small cross), and at least one pixel (at 32 x 32 scale)."""
    masks = _templates(image_size, 0, _blurs_for(image_size))["masks"][4]
    return max((image_size / 32) ** 2, 0.5 * float(masks.sum(axis=1).min()))


def analyse_details(
    img: Image.Image | np.ndarray,
    image_size: int = 32,
    *,
    max_shift: int = 1,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> list[dict[str, Any]]:
    """Per occupied cell, what :func:`analyse_image` saw, in reading order.

    Each dict: ``position``, ``color``, ``shape``, ``size``, ``iou`` (soft IoU of the best
    template, 1.0 on a clean render), ``color_share`` (fraction of the foreground mass voting
    for the chosen colour) and ``mass`` (foreground mass in pixels). Useful to see how
    confident a reading of a generated image is.
    """
    arr = to_float_image(img, image_size, value_range)
    geo = grid_geometry(image_size)
    tmpl = _templates(image_size, max_shift, _blurs_for(image_size))
    fg = _ramp(arr.max(axis=2))
    hue = np.argmax(arr @ _PALETTE_DIRS.T, axis=2)
    threshold = min_object_area(image_size)
    found = []
    for cell, position in enumerate(POSITIONS):
        row, col = divmod(cell, 3)
        (y0, y1), (x0, x1) = geo["bounds"][row], geo["bounds"][col]
        f = fg[y0:y1, x0:x1].ravel()
        mass = float(f.sum())
        if mass < threshold:
            continue
        masks = tmpl["masks"][cell]
        iou = np.minimum(masks, f).sum(axis=1) / np.maximum(masks, f).sum(axis=1)
        best = int(np.argmax(iou))
        if iou[best] < MIN_IOU:
            continue
        shape, size = tmpl["labels"][best]
        votes = np.bincount(hue[y0:y1, x0:x1].ravel(), weights=f, minlength=len(COLORS))
        found.append(
            {
                "position": position,
                "color": COLORS[int(np.argmax(votes))],
                "shape": shape,
                "size": size,
                "iou": float(iou[best]),
                "color_share": float(votes.max() / mass),
                "mass": mass,
            }
        )
    return found


def analyse_image(
    img: Image.Image | np.ndarray,
    image_size: int = 32,
    *,
    max_shift: int = 1,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Scene | None:
    """Read an image back into its objects (see the module docstring for the method).

    Returns None when no cell holds an object (an empty or black image). Exact on
    :func:`render` output; measured at 32 x 32 on random 1-3 object scenes: exact under
    Gaussian noise up to std 0.15, Gaussian blur up to sigma 1.0 (with noise 0.05: 299/300) and
    1-pixel offsets (``max_shift``). Small shapes (5 px) are the first to go under heavier blur.
    Any input, even pure noise, is read as *some* scene; :func:`analyse_details` gives the
    per-object IoU to judge how clean a reading is.
    """
    details = analyse_details(img, image_size, max_shift=max_shift, value_range=value_range)
    if not details:
        return None
    objs = tuple(Obj(d["shape"], d["color"], d["size"], d["position"]) for d in details)
    return Scene(objs, image_size)


# ----------------------------------------------------------------------------- scoring

SCORE_KEYS: tuple[str, ...] = ("exact", "count", *ATTRIBUTES)


def _agreement(a: Obj, b: Obj) -> int:
    return sum(getattr(a, k) == getattr(b, k) for k in ATTRIBUTES)


def _match(pred: Sequence[Obj], true: Sequence[Obj]) -> list[tuple[Obj, Obj]]:
    """Pairs (pred, true) maximising the number of agreeing attributes: exhaustive over
    assignments up to 6 x 6 objects, greedy (best pair first) beyond that."""
    if not pred or not true:
        return []
    small, large, flipped = (pred, true, False) if len(pred) <= len(true) else (true, pred, True)
    if len(large) <= 6:
        best, best_score = None, -1
        for perm in itertools.permutations(range(len(large)), len(small)):
            score = sum(_agreement(small[i], large[j]) for i, j in enumerate(perm))
            if score > best_score:
                best, best_score = perm, score
        pairs = [(small[i], large[j]) for i, j in enumerate(best)]
    else:
        cand = sorted(
            ((_agreement(s, t), i, j) for i, s in enumerate(small) for j, t in enumerate(large)), reverse=True
        )
        used_i, used_j, pairs = set(), set(), []
        for _, i, j in cand:
            if i not in used_i and j not in used_j:
                used_i.add(i)
                used_j.add(j)
                pairs.append((small[i], large[j]))
    return [(b, a) for a, b in pairs] if flipped else pairs


def compare_objects(pred: Sequence[Obj], scene: Scene) -> dict[str, float]:
    """Scores of predicted objects against a scene (all in [0, 1]).

    ``exact``: same set of objects, every attribute right. ``count``: same number of objects.
    Per attribute (``shape``, ``color``, ``size``, ``position``): predicted and true objects are
    paired to agree on as many attributes as possible, and the score is the number of pairs
    agreeing on that attribute divided by ``max(#pred, #true)``, so a missing or extra object
    costs every attribute.
    """
    true = scene.objects
    pairs = _match(pred, true)
    denom = max(len(pred), len(true))
    scores = {
        "exact": float(len(pred) == len(true) and set(pred) == set(true)),
        "count": float(len(pred) == len(true)),
    }
    for key in ATTRIBUTES:
        scores[key] = sum(getattr(p, key) == getattr(t, key) for p, t in pairs) / denom
    return scores


def score_caption(pred: str, scene: Scene) -> dict[str, float]:
    """Score a caption (image-to-text) against the true scene.

    ``parsed``: the caption parses strictly (:func:`parse_caption`). ``exact``: it parses to
    exactly the scene. Per-attribute scores and ``count`` use the lenient reading
    (:func:`extract_objects`), so a caption with a broken count word still earns partial credit.
    """
    strict = parse_caption(pred, scene.image_size)
    scores = compare_objects(extract_objects(pred), scene)
    scores["exact"] = float(strict is not None and strict == scene)
    scores["parsed"] = float(strict is not None)
    return scores


def question_kind(question: str) -> str:
    """The kind of a :func:`tasks.shapes.world.questions` question: how_many, what_color, what_shape,
    how_big or where_is (its first two words)."""
    return "_".join(question.split()[:2])


def score_answer(pred: str, answer: str) -> bool:
    """An answer is right when it is the expected words (surrounding space and a final period
    ignored)."""
    return " ".join(pred.split()).rstrip(".") == answer


def score_image(
    img: Image.Image | np.ndarray,
    scene: Scene,
    *,
    max_shift: int = 1,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> dict[str, float]:
    """Score an image (text-to-image) against the scene it should show: the image is analysed
    (:func:`analyse_image`) and its objects compared (:func:`compare_objects`)."""
    found = analyse_image(img, scene.image_size, max_shift=max_shift, value_range=value_range)
    return compare_objects(found.objects if found is not None else (), scene)


def mean_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average a list of score dicts key by key (keys present in every dict); adds ``n``."""
    if not scores:
        return {"n": 0.0}
    keys = [k for k in scores[0] if all(k in s for s in scores)]
    out = {k: float(np.mean([s[k] for s in scores])) for k in keys}
    out["n"] = float(len(scores))
    return out


