"""UnifiedPipeline refuses bad arguments with a ValueError that names them, in every task (the
CLI and the demo rely on it), and accepts what a UI sends for whole numbers (8.0)."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from unified.apps.pipeline import UnifiedPipeline, open_image

NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def pipe(tiny_unified):
    return UnifiedPipeline.from_model(tiny_unified)


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (32, 32), (255, 0, 0))


def _tasks(pipe, image):
    return {
        "text": lambda **kw: pipe.generate_text("hello", **{"max_new_tokens": 4, **kw}),
        "caption": lambda **kw: pipe.caption(image, **{"max_new_tokens": 4, **kw}),
        "image": lambda **kw: pipe.text_to_image("a red circle", **kw),
    }


BAD = [  # (keyword arguments, words of the message)
    (dict(guidance=NAN), "guidance"),
    (dict(guidance=INF), "guidance"),
    (dict(guidance=-0.5), "guidance"),
    (dict(shift=NAN), "shift"),
    (dict(shift=0.0), "shift"),
    (dict(steps=0), "steps"),
    (dict(steps=8.5), "steps must be a whole number"),
    (dict(steps=NAN), "steps must be a whole number"),
    (dict(steps="8"), "steps must be a whole number"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=0.5), "seed must be a whole number"),
    (dict(seed=True), "seed must be a whole number"),
]


@pytest.mark.parametrize("task", ["text", "caption", "image"])
@pytest.mark.parametrize("kwargs,words", BAD, ids=[f"{k}" for k, _ in BAD])
def test_bad_sampling_arguments_are_refused_by_name(pipe, image, task, kwargs, words):
    with pytest.raises(ValueError, match=words):
        _tasks(pipe, image)[task](**kwargs)


@pytest.mark.parametrize("task", ["text", "caption"])
@pytest.mark.parametrize("kwargs,words", [(dict(temperature=NAN), "temperature"),
                                          (dict(temperature=-1.0), "temperature"),
                                          (dict(max_new_tokens=0), "max_new_tokens"),
                                          (dict(max_new_tokens=2.5), "max_new_tokens")])
def test_bad_text_arguments_are_refused_by_name(pipe, image, task, kwargs, words):
    with pytest.raises(ValueError, match=words):
        _tasks(pipe, image)[task](**kwargs)


def test_top_p_nan_and_negative_trajectory(pipe):
    with pytest.raises(ValueError, match="top_p"):
        pipe.generate_text("hello", top_p=NAN)
    with pytest.raises(ValueError, match="trajectory"):
        pipe.text_to_image("a red circle", trajectory=-1)


def test_integral_floats_count_as_whole_numbers(pipe):
    a = pipe.generate_text("hello", max_new_tokens=8, steps=4, seed=3)
    b = pipe.generate_text("hello", max_new_tokens=8.0, steps=4.0, seed=3.0)
    assert a.text == b.text


def test_image_size_is_checked_before_decoding(tmp_path):
    """A PNG whose header claims 10000 x 10000 but holds no pixel data: refused as too large,
    which shows the pixels were never decoded (decoding would fail on the missing data)."""
    full = tmp_path / "full.png"
    Image.new("1", (10_000, 10_000)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:64])
    for path in (full, cut):
        with pytest.raises(ValueError, match=r"too large \(10000 x 10000\)"):
            open_image(path)


def test_unreadable_and_missing_files(tmp_path):
    text = tmp_path / "a.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable image: a.png"):
        open_image(text)
    with pytest.raises(ValueError, match="no such image file"):
        open_image(tmp_path / "missing.png")
    ok = tmp_path / "ok.png"
    Image.new("RGB", (40, 20), "blue").save(ok)
    small = tmp_path / "small.png"
    small.write_bytes(ok.read_bytes()[:-30])  # a truncated file: readable header, bad data
    assert open_image(ok).size == (40, 20)
    with pytest.raises(ValueError, match="not a readable image: small.png"):
        open_image(small)


def test_reranked_caption_is_one_of_its_samples_and_counts_its_calls(pipe, image):
    plain = [pipe.caption(image, max_new_tokens=8, steps=2, seed=s) for s in range(3)]
    best = pipe.caption(image, max_new_tokens=8, steps=2, seed=0, rerank=3)
    assert best.text in {p.text for p in plain}
    assert best.nfe > sum(p.nfe for p in plain)  # the samples plus the scoring calls
    with pytest.raises(ValueError, match="cannot stream"):
        pipe.caption(image, rerank=3, stream=True)
    with pytest.raises(ValueError, match="rerank"):
        pipe.caption(image, rerank=-1)
