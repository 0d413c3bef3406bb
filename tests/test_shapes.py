"""Shapes world: scenes, captions, rendering, image analysis, scoring, splits and shards."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageFilter

from tasks.shapes import world as S
from tasks.shapes import evaluate as E
from tasks.shapes.world import Obj, Scene, make_shapes_shards
from unified.data.shards import write_image_text_shards


def _scenes(n: int, seed: int = 0, difficulties=(1, 2, 3), split: str = "any", image_size: int = 32):
    rng = np.random.default_rng(seed)
    return [S.sample_scene(rng, difficulties[i % len(difficulties)], image_size, split) for i in range(n)]


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return _scenes(300)


TWO = Scene((Obj("cross", "cyan", "small", "center"), Obj("circle", "red", "large", "top left")))


# ----------------------------------------------------------------------------- vocabulary and scenes


def test_vocabulary_and_palette():
    assert (len(S.SHAPES), len(S.COLORS), len(S.SIZES), len(S.POSITIONS)) == (4, 6, 2, 9)
    assert set(S.PALETTE) == set(S.COLORS)
    dirs = np.array([S.PALETTE[c] for c in S.COLORS], dtype=float)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    cos = dirs @ dirs.T
    assert cos[~np.eye(6, dtype=bool)].max() < 0.75  # hues stay apart when darkened
    geo = S.grid_geometry(32)
    assert geo["radius"] == {"small": 2, "large": 4}
    # Every (shape, size) template is a distinct pixel set.
    masks = {(s, z): S.shape_mask(s, geo["radius"][z]) for s in S.SHAPES for z in S.SIZES}
    sums = {k: int(m.sum()) for k, m in masks.items()}
    assert len(set(sums.values())) == len(sums)


def test_scene_is_canonical_validated_and_json_round_trips():
    a = TWO
    b = Scene(tuple(reversed(a.objects)))
    assert a == b and a.objects[0].position == "top left"
    assert Scene.from_json(a.to_json()) == a
    assert Scene.from_json(json.dumps({**a.to_json(), "caption": "x"})) == a
    with pytest.raises(ValueError):
        Obj("hexagon", "red", "large", "top")
    with pytest.raises(ValueError):
        Scene((Obj("circle", "red", "large", "top"), Obj("square", "blue", "small", "top")))
    with pytest.raises(ValueError):
        Scene(())
    with pytest.raises(ValueError):
        Scene(a.objects, image_size=16)


def test_sampling_is_deterministic_and_respects_difficulty():
    assert _scenes(20, seed=3) == _scenes(20, seed=3)
    assert S.scene_at(5, 17, 3, "train") == S.scene_at(5, 17, 3, "train")
    for d in (1, 2, 3):
        counts = {len(s) for s in _scenes(200, seed=d, difficulties=(d,))}
        assert counts == set(range(1, d + 1))
    with pytest.raises(ValueError):
        S.sample_scene(np.random.default_rng(0), difficulty=0)
    with pytest.raises(ValueError):
        S.sample_scene(np.random.default_rng(0), split="test")


def test_iter_scenes_keys_and_seed_convention():
    items = list(S.iter_scenes(7, 50, difficulty=2, split="train"))
    keys = [k for k, _ in items]
    assert len(set(keys)) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)
    assert list(S.iter_scenes(7, 10, 2, "train", start=40)) == items[40:]
    assert S.eval_seed(0) == S.EVAL_SEED_BASE and S.is_eval_seed(S.eval_seed(123))
    assert not S.is_eval_seed(S.TRAIN_SEED_LIMIT - 1)
    with pytest.raises(ValueError):
        S.eval_seed(S.EVAL_SEED_BASE)
    # Training and evaluation streams differ.
    train = [s for _, s in S.iter_scenes(0, 20, 3, "any")]
    evals = [s for _, s in S.iter_scenes(S.eval_seed(0), 20, 3, "any")]
    assert train != evals


# ----------------------------------------------------------------------------- held-out combinations


def test_heldout_combos_split():
    assert 0.08 <= len(S.HELDOUT_COMBOS) / len(S.ALL_COMBOS) <= 0.12
    # Every attribute pair inside a held-out combo is still seen in training.
    for shape, color, size in S.HELDOUT_COMBOS:
        assert any(c[:2] == (shape, color) for c in S.TRAIN_COMBOS)
        assert any((c[0], c[2]) == (shape, size) for c in S.TRAIN_COMBOS)
        assert any(c[1:] == (color, size) for c in S.TRAIN_COMBOS)
    train = _scenes(1500, seed=11, difficulties=(3,), split="train")
    assert not any(S.is_heldout_combo(o) for s in train for o in s.objects)
    assert {o.combo for s in train for o in s.objects} == set(S.TRAIN_COMBOS)
    heldout = _scenes(300, seed=12, split="heldout")
    assert all(s.has_heldout_combo for s in heldout)
    assert {o.combo for s in heldout for o in s.objects} >= S.HELDOUT_COMBOS
    assert any(s.has_heldout_combo for s in _scenes(300, seed=13, split="any"))


# ----------------------------------------------------------------------------- captions


def test_caption_examples():
    one = Scene((Obj("circle", "red", "large", "top left"),))
    assert S.caption(one) == "a large red circle at the top left"
    assert S.caption(TWO) == (
        "two objects: a large red circle at the top left and a small cyan cross at the center"
    )
    three = Scene(TWO.objects + (Obj("triangle", "blue", "small", "bottom right"),))
    assert S.caption(three).startswith("three objects: a large red circle at the top left, a small cyan")
    assert S.caption(three).endswith(" and a small blue triangle at the bottom right")


def test_caption_parse_round_trip(scenes):
    many = scenes + _scenes(30, seed=1, difficulties=(9,)) + _scenes(20, seed=2, image_size=48)
    for scene in many:
        text = S.caption(scene)
        assert S.parse_caption(text, scene.image_size) == scene, text
        assert S.extract_objects(text) == list(scene.objects)
    # Forgiving about case, spaces, final period and object order.
    text = "Two objects:  a small cyan cross at the center and a large red circle at the top left."
    assert S.parse_caption(text) == TWO


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "a large red circle",
        "a huge red circle at the top left",
        "a large red circle at the middle",
        "one objects: a large red circle at the top left",
        "three objects: a large red circle at the top left and a small cyan cross at the center",
        "two objects: a large red circle at the top left, a small cyan cross at the center",
        "two objects: a large red circle at the top and a small cyan cross at the top",
        "a large red circle at the top left and a small cyan cross at the center",
    ],
)
def test_parse_caption_rejects(text):
    assert S.parse_caption(text) is None


# ----------------------------------------------------------------------------- rendering and analysis


def test_render_is_plain_palette():
    img = S.render(TWO)
    assert img.mode == "RGB" and img.size == (32, 32)
    colors = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
    assert colors == {S.BACKGROUND, S.PALETTE["red"], S.PALETTE["cyan"]}


def test_analyse_exact_on_rendered_scenes(scenes):
    assert all(E.analyse_image(S.render(s)) == s for s in scenes)
    for size in (24, 64):
        assert all(E.analyse_image(S.render(s), size) == s for s in _scenes(30, seed=size, image_size=size))


def test_analyse_robust_to_noise_blur_and_shift(scenes):
    rng = np.random.default_rng(0)
    for scene in scenes:
        noisy = S.render_array(scene) / 255.0 + rng.normal(0.0, 0.05, (32, 32, 3))
        assert E.analyse_image(noisy) == scene
    for scene in scenes[:100]:
        blurred = np.asarray(S.render(scene).filter(ImageFilter.GaussianBlur(0.8))) / 255.0
        assert E.analyse_image(blurred + rng.normal(0.0, 0.05, (32, 32, 3))) == scene
        assert E.analyse_image(np.roll(S.render_array(scene), (1, -1), axis=(0, 1))) == scene


def test_analyse_input_formats():
    arr = S.render_array(TWO)
    assert E.analyse_image(arr) == TWO
    chw = arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    assert E.analyse_image(chw, value_range=(-1, 1)) == TWO
    assert E.analyse_image(S.render(TWO).resize((64, 64), Image.NEAREST)) == TWO
    assert E.analyse_image(np.zeros((32, 32, 3), np.uint8)) is None
    details = E.analyse_details(arr)
    assert [d["position"] for d in details] == ["top left", "center"]
    assert all(d["iou"] == 1.0 and d["color_share"] == 1.0 for d in details)


# ----------------------------------------------------------------------------- scoring


def _corrupt(scene: Scene, attr: str) -> Scene:
    o = scene.objects[0]
    if attr == "position":
        free = [p for p in S.POSITIONS if p not in {x.position for x in scene.objects}]
        new = Obj(o.shape, o.color, o.size, free[0])
    else:
        vocab = {"shape": S.SHAPES, "color": S.COLORS, "size": S.SIZES}[attr]
        value = next(v for v in vocab if v != getattr(o, attr))
        new = Obj(**{**o.to_json(), attr: value})
    return Scene((new,) + scene.objects[1:], scene.image_size)


def test_scores_truth_and_corruptions(scenes):
    for scene in scenes[:60]:
        truth = E.score_caption(S.caption(scene), scene)
        assert all(v == 1.0 for v in truth.values()), truth
        img_truth = E.score_image(S.render(scene), scene)
        assert all(v == 1.0 for v in img_truth.values()), img_truth
        for attr in S.ATTRIBUTES:
            wrong = _corrupt(scene, attr)
            cap = E.score_caption(S.caption(wrong), scene)
            img = E.score_image(S.render(wrong), scene)
            for sc in (cap, img):
                assert sc["exact"] == 0.0 and sc[attr] < 1.0 and sc["count"] == 1.0
                assert all(sc[a] == 1.0 for a in S.ATTRIBUTES if a != attr)


def test_score_details():
    cap = E.score_caption(S.caption(TWO).replace("cyan", "blue"), TWO)
    assert cap["color"] == 0.5 and cap["parsed"] == 1.0 and cap["exact"] == 0.0
    missing = E.score_caption("a large red circle at the top left", TWO)
    assert missing["count"] == 0.0 and missing["shape"] == 0.5
    no_and = "two objects: a large red circle at the top left, a small cyan cross at the center"
    broken = E.score_caption(no_and, TWO)
    assert broken["parsed"] == 0.0 and broken["exact"] == 0.0 and broken["shape"] == 1.0
    assert E.score_caption("nothing here", TWO)["shape"] == 0.0
    blank = E.score_image(np.zeros((32, 32, 3), np.uint8), TWO)
    assert all(v == 0.0 for v in blank.values())
    mean = E.mean_scores([E.score_caption(S.caption(TWO), TWO), cap])
    assert mean["exact"] == 0.5 and mean["n"] == 2.0


# ----------------------------------------------------------------------------- shards


def _read(urls):
    ds = wds.WebDataset([str(u) for u in urls], shardshuffle=False).decode("pil")
    return list(ds)


def test_make_shapes_shards_round_trip(tmp_path):
    counts = make_shapes_shards(tmp_path, n_train=9, n_heldout=6, difficulty=3, seed=4, max_per_shard=4)
    assert counts == {"train_samples": 9, "heldout_samples": 6, "train_shards": 3, "heldout_shards": 2}
    train = _read(sorted((tmp_path / "train").glob("*.tar")))
    heldout = _read(sorted((tmp_path / "heldout").glob("*.tar")))
    assert len(train) == 9 and len(heldout) == 6
    for sample in train + heldout:
        meta = sample["json"]
        scene = Scene.from_json(meta)
        assert scene == S.scene_at(meta["seed"], meta["index"], 3, meta["split"])
        assert sample["txt"] == S.caption(scene) == meta["caption"]
        img = sample["png"]
        assert isinstance(img, Image.Image) and img.size == (32, 32)
        assert np.array_equal(np.asarray(img.convert("RGB")), S.render_array(scene))
        assert E.analyse_image(img) == scene
    assert all(s["json"]["seed"] == 4 and s["json"]["split"] == "train" for s in train)
    assert not any(Scene.from_json(s["json"]).has_heldout_combo for s in train)
    assert all(S.is_eval_seed(s["json"]["seed"]) for s in heldout)
    assert [s["json"]["split"] for s in heldout] == ["heldout", "train"] * 3
    assert all(s["json"]["heldout_combo"] for s in heldout[::2])
    with pytest.raises(ValueError):
        make_shapes_shards(tmp_path / "x", 1, 1, seed=S.EVAL_SEED_BASE)


def test_write_image_text_shards_checks_keys(tmp_path):
    rec = list(S.iter_records(0, 2, 1, "train"))
    assert len(write_image_text_shards(rec, tmp_path / "ok")) == 1
    with pytest.raises(ValueError, match="duplicate"):
        write_image_text_shards([rec[0], rec[0]], tmp_path / "dup")
    with pytest.raises(ValueError, match="bad sample key"):
        write_image_text_shards([("a.b", *rec[0][1:])], tmp_path / "dot")


def test_shards_feed_the_image_text_reader(tmp_path):
    from unified.data.streams import image_text_samples

    make_shapes_shards(tmp_path, n_train=3, n_heldout=0, difficulty=2)
    samples = list(image_text_samples(sorted((tmp_path / "train").glob("*.tar")), image_size=32))
    assert len(samples) == 3
    for s in samples:
        assert tuple(s["image"].shape) == (3, 32, 32)
        assert S.parse_caption(s["caption"]) == Scene.from_json(s["meta"])
        assert E.analyse_image(s["image"].numpy(), value_range=(-1, 1)) == Scene.from_json(s["meta"])


def test_cli_make_shards_shapes(tmp_path, capsys):
    from unified.apps.cli import main

    assert main(["make-shards", "shapes", "--n-train", "5", "--n-heldout", "4", "--difficulty",
                 "2", "--output", str(tmp_path)]) == 0
    assert "train_samples" in capsys.readouterr().out
    assert len(list((tmp_path / "train").glob("*.tar"))) == 1
    samples = list(wds.WebDataset(str(next((tmp_path / "heldout").glob("*.tar"))),
                                  shardshuffle=False).decode("pil"))
    assert len(samples) == 4
    for s in samples:
        assert E.analyse_image(s["png"]) == Scene.from_json(s["json"])
        assert S.caption(Scene.from_json(s["json"])) == s["txt"]
