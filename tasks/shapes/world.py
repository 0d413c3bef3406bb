"""Shapes world: procedural images with compositional captions, and an exact evaluator.

A scene is a small set of objects on a black ``image_size`` x ``image_size`` canvas (32 by
default). Each object has four attributes, each from a closed vocabulary:

* ``shape``    -- :data:`SHAPES`    (circle, square, triangle, cross)
* ``color``    -- :data:`COLORS`    (six saturated primaries / secondaries, see :data:`PALETTE`)
* ``size``     -- :data:`SIZES`     (small, large)
* ``position`` -- :data:`POSITIONS` (the nine cells of a 3 x 3 grid, in reading order)

Objects sit at the centre of distinct grid cells, so they never touch and a caption never has
to describe overlap. 4 x 6 x 2 x 9 = 432 single-object scenes exist; scenes of up to three
objects number about 9.4 million.

Text side. :func:`caption` writes a short, regular English description, deterministic for a
scene, with the objects in reading order of their cells and counts in words::

    a large red circle at the top left
    two objects: a small blue square at the center and a large green cross at the bottom right
    three objects: a ..., a ... and a ...

:func:`parse_caption` inverts it exactly (``None`` when the text does not parse).

Image side. :func:`render` draws a scene with hard pixel edges (no anti-aliasing), each shape a
fixed pixel template centred on its cell (see :func:`shape_mask`). :func:`analyse_image` reads
an image back into a :class:`Scene`: per cell, a soft foreground map (the brightest channel
ramped around 0.5), presence from the foreground mass, colour by a foreground-weighted vote of
the nearest palette direction (cosine, so a darkened or blurred edge keeps its hue), and
shape + size jointly by the best soft IoU against the eight (shape, size) templates, each also
blurred (:data:`TEMPLATE_BLURS`) and shifted by up to ``max_shift`` pixels. A cell counts as
occupied when its foreground mass and best IoU pass small floors. It is exact on rendered
scenes and tolerant to noise, blur and 1-pixel offsets, as in generated images.

Evaluation. :func:`score_caption` (image-to-text) and :func:`score_image` (text-to-image)
return ``exact`` (every object and attribute right) plus per-attribute accuracies;
:func:`mean_scores` averages them over a set.

Splits. Five of the 48 (shape, color, size) combinations (:data:`HELDOUT_COMBOS`, ~10%) never
occur in ``split="train"`` scenes; every pair of attributes inside them does, so a held-out
scene tests composition, not new vocabulary. Seeds are split too: training data uses seeds
``< EVAL_SEED_BASE`` (10**9), evaluation data seeds ``>= EVAL_SEED_BASE`` (:func:`eval_seed`).
Scenes are addressed by ``(seed, index)`` (:func:`scene_at`), so any worker can generate any
slice. Note that at difficulty 1 only 432 scenes exist, so seed-disjoint sets still share
scenes; the held-out combos are what measure generalisation there.

Only numpy and PIL are used; everything is deterministic.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unified.data.shards import write_image_text_shards

# ----------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "position")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: RGB of each colour: pure primaries / secondaries, pairwise cosine <= 0.71 so the hue of a
#: pixel survives darkening (blur against the black background) and noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

MAX_DIFFICULTY = len(POSITIONS)  # difficulty d = 1..d objects, one per grid cell
MIN_IMAGE_SIZE = 24  # below this the small shapes stop being distinct templates

#: Held-out (shape, color, size) combinations (5 of 48): never in ``split="train"`` scenes.
#: Each shape, each size and five colours occur; every (shape, color), (shape, size) and
#: (color, size) pair inside them still occurs in training through the other size/colours.
HELDOUT_COMBOS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("circle", "blue", "large"),
        ("square", "yellow", "small"),
        ("triangle", "red", "large"),
        ("cross", "green", "small"),
        ("circle", "magenta", "small"),
    }
)
ALL_COMBOS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(SHAPES, COLORS, SIZES))
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELDOUT_COMBOS)
HELDOUT_COMBO_LIST: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBOS if c in HELDOUT_COMBOS)
SPLITS: tuple[str, ...] = ("train", "heldout", "any")

#: Seed convention: training data uses seeds in [0, EVAL_SEED_BASE), evaluation data seeds
#: >= EVAL_SEED_BASE (use :func:`eval_seed`), so no evaluation scene is drawn from a training
#: random stream.
EVAL_SEED_BASE = 10**9
TRAIN_SEED_LIMIT = EVAL_SEED_BASE


def eval_seed(seed: int = 0) -> int:
    """The evaluation seed paired with ``seed`` (``EVAL_SEED_BASE + seed``)."""
    if not 0 <= seed < EVAL_SEED_BASE:
        raise ValueError(f"seed must be in [0, {EVAL_SEED_BASE}), got {seed}")
    return EVAL_SEED_BASE + seed


def is_eval_seed(seed: int) -> bool:
    """True for seeds reserved for evaluation data (``>= EVAL_SEED_BASE``)."""
    return seed >= EVAL_SEED_BASE


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """One object: ``shape`` in SHAPES, ``color`` in COLORS, ``size`` in SIZES, ``position`` in
    POSITIONS. Raises ValueError on anything else."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, vocab in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS)):
            if getattr(self, name) not in vocab:
                raise ValueError(f"bad {name} {getattr(self, name)!r}: expected one of {vocab}")

    @property
    def cell(self) -> int:
        """Grid cell index 0..8 in reading order (row * 3 + column)."""
        return POSITIONS.index(self.position)

    @property
    def combo(self) -> tuple[str, str, str]:
        """The (shape, color, size) combination, the unit of the held-out split."""
        return (self.shape, self.color, self.size)

    def phrase(self) -> str:
        """``"a large red circle at the top left"``."""
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"

    def to_json(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """A set of objects in distinct grid cells on an ``image_size`` canvas.

    ``objects`` is stored in reading order of the cells (the constructor sorts it), so two
    scenes with the same objects compare equal whatever order they were given in. Raises
    ValueError for an empty scene, two objects in one cell or a too small canvas.
    """

    objects: tuple[Obj, ...]
    image_size: int = 32

    def __post_init__(self) -> None:
        if not all(isinstance(o, Obj) for o in self.objects):
            raise ValueError("scene objects must be Obj instances")
        objs = tuple(sorted(self.objects, key=lambda o: o.cell))
        if not objs:
            raise ValueError("a scene needs at least one object")
        if len({o.cell for o in objs}) != len(objs):
            raise ValueError("two objects in one grid cell")
        if int(self.image_size) < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        object.__setattr__(self, "objects", objs)
        object.__setattr__(self, "image_size", int(self.image_size))

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def has_heldout_combo(self) -> bool:
        """True when at least one object is a held-out (shape, color, size) combination."""
        return any(is_heldout_combo(o) for o in self.objects)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict ``{"image_size": 32, "objects": [{"shape", "color", "size", "position"}]}``."""
        return {"image_size": self.image_size, "objects": [o.to_json() for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | bytes) -> Scene:
        """Inverse of :meth:`to_json`; accepts the dict or its JSON text. Extra keys (e.g. the
        ``caption`` / ``split`` metadata written to shards) are ignored."""
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        objs = tuple(Obj(o["shape"], o["color"], o["size"], o["position"]) for o in data["objects"])
        return cls(objs, int(data.get("image_size", 32)))


def is_heldout_combo(obj: Obj | tuple[str, str, str]) -> bool:
    """True when the object's (shape, color, size) is one of :data:`HELDOUT_COMBOS`."""
    combo = obj.combo if isinstance(obj, Obj) else tuple(obj)
    return combo in HELDOUT_COMBOS


def sample_scene(
    rng: np.random.Generator, difficulty: int = 1, image_size: int = 32, split: str = "any"
) -> Scene:
    """Draw a scene of 1..``difficulty`` objects (uniform count) in distinct random cells.

    ``split="train"``: every object's combination is drawn uniformly from the 43 non-held-out
    ones. ``split="heldout"``: one uniformly chosen object has a held-out combination, the rest
    any combination (so every such scene has at least one). ``split="any"``: all 48.
    """
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {difficulty}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = int(rng.integers(1, difficulty + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=n, replace=False))
    forced = int(rng.integers(n)) if split == "heldout" else -1
    objs = []
    for i, cell in enumerate(cells):
        pool = HELDOUT_COMBO_LIST if i == forced else TRAIN_COMBOS if split == "train" else ALL_COMBOS
        shape, color, size = pool[int(rng.integers(len(pool)))]
        objs.append(Obj(shape, color, size, POSITIONS[cell]))
    return Scene(tuple(objs), image_size)


def scene_at(seed: int, index: int, difficulty: int = 1, split: str = "any", image_size: int = 32) -> Scene:
    """The ``index``-th scene of stream ``seed``: its own generator seeded by ``[seed, index]``,
    so any slice of a stream can be made independently (and by several workers)."""
    return sample_scene(np.random.default_rng([seed, index]), difficulty, image_size, split)


def scene_key(seed: int, index: int, difficulty: int, split: str) -> str:
    """Filename-safe sample key (letters, digits, ``-``; no dots)."""
    return f"shapes-{split}-d{difficulty}-s{seed}-{index:08d}"


def iter_scenes(
    seed: int, n: int, difficulty: int = 1, split: str = "any", *, start: int = 0, image_size: int = 32
) -> Iterator[tuple[str, Scene]]:
    """Yield ``(key, scene)`` for indices ``start .. start + n - 1`` of stream ``seed``.

    Keys are unique per (seed, difficulty, split, index). Use seeds ``< EVAL_SEED_BASE`` for
    training data and :func:`eval_seed` for evaluation data.
    """
    for i in range(start, start + n):
        yield scene_key(seed, i, difficulty, split), scene_at(seed, i, difficulty, split, image_size)


# ----------------------------------------------------------------------------- captions


def caption(scene: Scene) -> str:
    """Compositional caption, deterministic: one object -> its phrase; several -> ``"<count>
    objects: "`` and the phrases in reading order, joined by ``", "`` and a final ``" and "``."""
    phrases = [o.phrase() for o in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    return f"{COUNT_WORDS[len(phrases) - 1]} objects: {', '.join(phrases[:-1])} and {phrases[-1]}"


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE = (
    rf"a (?P<size>{_alternation(SIZES)}) (?P<color>{_alternation(COLORS)}) "
    rf"(?P<shape>{_alternation(SHAPES)}) at the (?P<position>{_alternation(POSITIONS)})"
)
_PHRASE_RE = re.compile(_PHRASE)
_PHRASE_FULL = re.compile(rf"^{_PHRASE}$")
_PREFIX_RE = re.compile(rf"^(?P<count>{_alternation(COUNT_WORDS)}) objects: (?P<rest>.*)$")


def _normalize(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".").strip()


def _phrase_obj(match: re.Match[str]) -> Obj:
    return Obj(match["shape"], match["color"], match["size"], match["position"])


def parse_caption(text: str, image_size: int = 32) -> Scene | None:
    """Inverse of :func:`caption`: the scene a caption describes, or None if it does not parse.

    Case, repeated whitespace and a final period are forgiven; objects may come in any order.
    The count word must match the number of phrases (and be >= two), positions must be
    distinct. ``parse_caption(caption(s), s.image_size) == s`` for every scene.
    """
    text = _normalize(text)
    prefix = _PREFIX_RE.match(text)
    if prefix is None:
        parts = [text]
    else:
        head, sep, last = prefix["rest"].rpartition(" and ")
        if not sep:
            return None
        parts = [*head.split(", "), last]
        if COUNT_WORDS.index(prefix["count"]) + 1 != len(parts) or len(parts) < 2:
            return None
    objs = []
    for part in parts:
        match = _PHRASE_FULL.match(part)
        if match is None:
            return None
        objs.append(_phrase_obj(match))
    try:
        return Scene(tuple(objs), image_size)
    except ValueError:
        return None


def extract_objects(text: str) -> list[Obj]:
    """Lenient reading: every well-formed object phrase found anywhere in ``text``, in order
    (count words, separators and stray words ignored; a repeated cell keeps its first phrase)."""
    found: dict[str, Obj] = {}
    for match in _PHRASE_RE.finditer(_normalize(text)):
        found.setdefault(match["position"], _phrase_obj(match))
    return list(found.values())


# ----------------------------------------------------------------------------- questions


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every (question, answer) the scene answers unambiguously, for visual question answering:

    * ``how many objects are there?`` -> a count word;
    * ``what color is the object at the <position>?`` -> its colour;
    * ``what shape is at the <position>?`` -> its shape;
    * ``how big is the <color> <shape> at the <position>?`` -> ``small`` / ``large``;
    * ``where is the <size> <color> <shape>?`` -> ``at the <position>`` (when that object is
      the only one of its kind in the scene).
    """
    out = [("how many objects are there?", COUNT_WORDS[len(scene) - 1])]
    kinds = [o.combo for o in scene.objects]
    for o in scene.objects:
        out.append((f"what color is the object at the {o.position}?", o.color))
        out.append((f"what shape is at the {o.position}?", o.shape))
        out.append((f"how big is the {o.color} {o.shape} at the {o.position}?", o.size))
        if kinds.count(o.combo) == 1:
            out.append((f"where is the {o.size} {o.color} {o.shape}?", f"at the {o.position}"))
    return out


# ----------------------------------------------------------------------------- geometry and rendering


@cache
def grid_geometry(image_size: int = 32) -> dict[str, Any]:
    """Pixel geometry of the 3 x 3 grid for a canvas size.

    Returns ``centers`` (pixel index of each row/column centre, so shapes are symmetric about a
    pixel), ``bounds`` (``[lo, hi)`` pixel ranges of the three rows/columns; pixel p belongs to
    the cell whose third of the canvas holds its centre p + 0.5) and ``radius`` per size (half
    extent in pixels: a shape spans ``2 r + 1`` pixels). At 32: centres 5, 16, 26; large r = 4
    (9 px), small r = 2 (5 px); objects in neighbouring cells are >= 1 px apart.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    third = image_size / 3
    centers = tuple(int((k + 0.5) * third) for k in range(3))
    edges = [int(np.ceil(k * third - 0.5)) for k in range(4)]
    bounds = tuple((edges[k], edges[k + 1]) for k in range(3))
    room = min(min(c - lo, hi - 1 - c) for c, (lo, hi) in zip(centers, bounds))
    large = min(room, int(0.4 * third + 0.5))
    small = max(2, round(0.55 * large))
    return {"centers": centers, "bounds": bounds, "radius": {"small": small, "large": large}}


@cache
def shape_mask(shape: str, radius: int) -> np.ndarray:
    """Boolean ``(2r+1, 2r+1)`` pixel template of a shape (read-only).

    circle: dx^2 + dy^2 <= (r + 0.5)^2; square: the full box; triangle: apex up, base the
    bottom row, ``|dx| <= (dy + r) / 2 + 0.25``; cross: a plus with arms ``2 (r // 3) + 1``
    pixels thick (1 px at r = 2, so it never equals the 5 x 5 circle).
    """
    if shape not in SHAPES:
        raise ValueError(f"bad shape {shape!r}")
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    if shape == "circle":
        mask = dx**2 + dy**2 <= (radius + 0.5) ** 2
    elif shape == "square":
        mask = np.ones_like(dx, dtype=bool)
    elif shape == "triangle":
        mask = np.abs(dx) <= (dy + radius) / 2 + 0.25
    else:
        t = radius // 3
        mask = (np.abs(dx) <= t) | (np.abs(dy) <= t)
    mask.setflags(write=False)
    return mask


def _cell_rc(position: str) -> tuple[int, int]:
    return divmod(POSITIONS.index(position), 3)


def render_array(scene: Scene) -> np.ndarray:
    """The scene as a ``(S, S, 3)`` uint8 array (black background, hard edges)."""
    geo = grid_geometry(scene.image_size)
    img = np.zeros((scene.image_size, scene.image_size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        r = geo["radius"][o.size]
        row, col = _cell_rc(o.position)
        cy, cx = geo["centers"][row], geo["centers"][col]
        window = img[cy - r : cy + r + 1, cx - r : cx + r + 1]
        window[shape_mask(o.shape, r)] = PALETTE[o.color]
    return img


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image (black background, hard edges, exactly analysable)."""
    return Image.fromarray(render_array(scene), mode="RGB")


# ----------------------------------------------------------------------------- records for shards


def scene_record(key: str, scene: Scene, **meta: Any) -> tuple[str, Image.Image, str, dict[str, Any]]:
    """``(key, image, caption, json)`` for one scene, the record
    :func:`unified.data.shards.write_image_text_shards` writes as ``KEY.png`` / ``KEY.txt`` /
    ``KEY.json``. The json is :meth:`Scene.to_json` plus ``caption``, ``heldout_combo`` and any
    ``meta`` (e.g. seed, index, split, difficulty); :meth:`Scene.from_json` reads it back."""
    text = caption(scene)
    info = {**scene.to_json(), "caption": text, "heldout_combo": scene.has_heldout_combo, **meta}
    return key, render(scene), text, info


def iter_records(
    seed: int, n: int, difficulty: int = 1, split: str = "any", *, start: int = 0, image_size: int = 32
) -> Iterator[tuple[str, Image.Image, str, dict[str, Any]]]:
    """:func:`iter_scenes` as shard records (see :func:`scene_record`)."""
    for offset, (key, scene) in enumerate(
        iter_scenes(seed, n, difficulty, split, start=start, image_size=image_size)
    ):
        meta = {"seed": seed, "index": start + offset, "split": split, "difficulty": difficulty}
        yield scene_record(key, scene, **meta)


def make_shapes_shards(
    out_dir: str | Path,
    n_train: int,
    n_heldout: int,
    difficulty: int = 1,
    seed: int = 0,
    max_per_shard: int = 2000,
    image_size: int = 32,
) -> dict[str, int]:
    """Write the shapes world to ``out_dir/train/`` and ``out_dir/heldout/``.

    train: ``n_train`` scenes of stream ``seed`` (must be < ``EVAL_SEED_BASE``) with
    ``split="train"``, so no held-out (shape, color, size) combination ever occurs.
    heldout: ``n_heldout`` scenes of the evaluation stream ``eval_seed(seed)`` (disjoint from
    every training stream), alternating ``split="heldout"`` (even indices: at least one
    held-out combination; measures composition) and ``split="train"`` (odd indices: seen
    combinations in new scenes; measures plain generalisation). Each sample's json holds the
    scene plus ``caption``, ``split``, ``heldout_combo``, ``seed``, ``index`` and
    ``difficulty``, so an evaluator can report the two halves apart.
    """
    if not 0 <= seed < EVAL_SEED_BASE:
        raise ValueError(f"training seed must be in [0, {EVAL_SEED_BASE}), got {seed}")
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"counts must be >= 0, got n_train={n_train}, n_heldout={n_heldout}")

    def records(stream: int, n: int, splits: tuple[str, ...]) -> Iterator[tuple[str, object, str, dict]]:
        for i in range(n):
            split = splits[i % len(splits)]
            scene = scene_at(stream, i, difficulty, split, image_size)
            meta = {"seed": stream, "index": i, "split": split, "difficulty": difficulty}
            yield scene_record(scene_key(stream, i, difficulty, split), scene, **meta)

    out = Path(out_dir)
    train = write_image_text_shards(
        records(seed, n_train, ("train",)), out / "train", "shapes", max_per_shard
    )
    heldout = write_image_text_shards(
        records(eval_seed(seed), n_heldout, ("heldout", "train")), out / "heldout", "shapes", max_per_shard
    )
    return {
        "train_samples": n_train,
        "heldout_samples": n_heldout,
        "train_shards": len(train),
        "heldout_shards": len(heldout),
    }
