"""unified/apps/inputs.py, the one place that checks user input: its rules, and the same
message from the pipeline, the command line and the demo's components for the same bad value."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import gradio as gr
import pytest
from PIL import Image

from demo.components import Knob, WholeNumber
from prior.flow import SamplerConfig
from unified.apps import inputs
from unified.apps.cli import main
from unified.apps.pipeline import UnifiedPipeline

HUGE = 10**400  # a 401-digit integer: float(HUGE) overflows


@pytest.mark.parametrize("value,words", [
    (8.5, "steps must be a whole number, got 8.5"),
    (math.nan, "steps must be a whole number, got nan"),
    (math.inf, "steps must be a whole number, got inf"),
    (True, "steps must be a whole number, got True"),
    ("8", "steps must be a whole number, got '8'"),
    (None, "steps is missing"),
    (0, "steps must be between 1 and 64, got 0"),
    (HUGE, "steps must be between 1 and 64, got a 401-digit number"),
    (-HUGE, "steps must be between 1 and 64, got a 401-digit number"),
    (Fraction(10**400, 3), "steps must be a whole number"),
])
def test_whole_numbers(value, words):
    with pytest.raises(ValueError) as err:
        inputs.whole("steps", value, 1, 64)
    assert str(err.value).startswith(words), str(err.value)


def test_integral_floats_are_whole_numbers():
    assert inputs.whole("steps", 8.0, 1, 64) == 8 and isinstance(inputs.whole("s", 8.0, 1, 9), int)
    assert inputs.whole("seed", 2**62, 0, 2**63) == 2**62


@pytest.mark.parametrize("value,words", [
    (math.nan, "guidance must be a finite number, got nan"),
    (-math.inf, "guidance must be a finite number, got -inf"),
    (HUGE, "guidance must be between 0 and 20, got a 401-digit number"),
    (False, "guidance must be a number, got False"),
    ([1], "guidance must be a number, got [1]"),
    ("x" * 1000, "guidance must be a number, got 'xxxx"),
    (None, "guidance is missing"),
])
def test_real_numbers(value, words):
    with pytest.raises(ValueError) as err:
        inputs.real("guidance", value, 0, 20)
    assert str(err.value).startswith(words) and len(str(err.value)) < 120, str(err.value)


def test_open_ranges_and_unbounded_huge_ints():
    with pytest.raises(ValueError, match="shift must be greater than 0, got 0"):
        inputs.KNOBS["shift"].check("shift", 0)
    assert inputs.KNOBS["shift"].check("shift", 3) == 3.0
    with pytest.raises(ValueError, match="shift must be a finite number, got a 401-digit number"):
        inputs.KNOBS["shift"].check("shift", HUGE)  # no upper bound: float() would overflow
    with pytest.raises(ValueError, match="shift must be a finite number, got a 401-digit number"):
        SamplerConfig(shift=HUGE)  # the sampler config's own check: the same words
    with pytest.raises(ValueError, match=r"top_p must be greater than 0 and at most 1, got 1\.5"):
        inputs.KNOBS["top_p"].check("top_p", 1.5)


@pytest.mark.parametrize("value,words", [
    ("a \ud800 b", "the prompt holds an invalid character at position 3: U+D800 is a lone"),
    (b"caf\xe9".decode("utf-8", "surrogateescape"), "position 4: U+DCE9"),
    ("", "the prompt is empty"),
    (" \n", "the prompt is empty"),
    ("x" * 2001, "the prompt is too long: 2001 characters, at most 2000"),
    (42, "the prompt must be text, got int"),
])
def test_texts(value, words):
    with pytest.raises(ValueError) as err:
        inputs.text("prompt", value)
    assert words in str(err.value), str(err.value)


def test_valid_texts_pass():
    assert inputs.text("prompt", "\U0001F600 ok") == "\U0001F600 ok"  # not a lone surrogate
    assert inputs.text("question", "", allow_empty=True) == ""
    with pytest.raises(ValueError, match="too many prompts: 257"):
        inputs.texts("prompt", ["a"] * 257)
    with pytest.raises(ValueError, match="no prompts given"):
        inputs.texts("prompt", [])


def test_images_from_bytes_and_data_urls():
    buf = io.BytesIO()
    Image.new("RGB", (5, 7), "red").save(buf, format="PNG")
    assert inputs.open_image_bytes(buf.getvalue()).size == (5, 7)
    big = io.BytesIO()
    Image.new("1", (5000, 10)).save(big, format="PNG")
    with pytest.raises(ValueError, match=r"too large \(5000 x 10\)"):
        inputs.open_image_bytes(big.getvalue())
    with pytest.raises(ValueError, match="is too large: .* bytes, at most 20 MB"):
        inputs.open_image_bytes(b"x" * (inputs.MAX_IMAGE_BYTES + 1))
    with pytest.raises(ValueError, match="data: URL image is too large"):
        inputs.image_from_data_url("data:image/png;base64," + "A" * (inputs.MAX_IMAGE_BYTES * 2))


# ---------------------------------------------------------------- one message everywhere
@pytest.fixture(scope="module")
def pipe(tiny_unified):
    return UnifiedPipeline.from_model(tiny_unified)


def _pipe_error(pipe, **kw) -> str:
    with pytest.raises(ValueError) as err:
        pipe.generate_text(kw.pop("prompt", "hello"), **{"max_new_tokens": 4, **kw})
    return str(err.value)


def _cli_error(capsys, argv) -> str:
    assert main([*argv, "--checkpoint", "/no/model/needed"]) == 2  # checked before loading
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err.split(": error: ", 1)[1]


def _demo_error(component, value) -> str:
    with pytest.raises(gr.Error) as err:
        component.preprocess(value)
    return err.value.message


@pytest.mark.parametrize("knob,value,flag,arg", [
    ("guidance", math.nan, "--guidance", "nan"),
    ("guidance", 1e9, "--guidance", "1e9"),
    ("steps", 0, "--steps", "0"),
    ("seed", HUGE, "--seed", str(HUGE)),
    ("temperature", math.inf, "--temperature", "inf"),
])
def test_pipeline_cli_and_demo_say_the_same(pipe, capsys, knob, value, flag, arg):
    expected = str(_pipe_error(pipe, **{knob: value}))
    assert _cli_error(capsys, ["generate", "hello", flag, arg]) == expected
    lo, hi = inputs.KNOBS[knob].lo, inputs.KNOBS[knob].hi
    comp = WholeNumber(minimum=lo, maximum=hi, precision=0, label=knob) if knob == "seed" else \
        Knob(lo, hi, precision=0 if inputs.KNOBS[knob].whole else None, label=knob)
    assert _demo_error(comp, value) == expected


def test_fractional_counts_are_refused_everywhere(pipe):
    assert _pipe_error(pipe, steps=8.5) == "steps must be a whole number, got 8.5"
    assert _demo_error(Knob(1, 64, precision=0, label="steps"), 8.5) == \
        "steps must be a whole number, got 8.5"
    assert _demo_error(Knob(0, 16, precision=0, label="trajectory frames"), 2.5) == \
        "trajectory frames must be a whole number, got 2.5"
    with pytest.raises(ValueError, match="steps must be a whole number, got 8.5"):
        SamplerConfig(steps=8.5)  # the sampler config's own check: the same words


def test_invalid_utf8_and_lone_surrogates_everywhere(pipe, capsys):
    bad = "caf" + b"\xe9".decode("utf-8", "surrogateescape")  # what argv holds for bad UTF-8
    expected = _pipe_error(pipe, prompt=bad)
    assert "U+DCE9 is a lone surrogate" in expected
    assert _cli_error(capsys, ["generate", bad]) == expected
    assert "U+D800" in _pipe_error(pipe, prompt="\ud800")
    assert pipe.generate_text("caf\u00e9", max_new_tokens=4).text is not None


def test_a_lazily_opened_huge_image_is_refused_before_decoding(pipe, tmp_path):
    """A PIL image opened by the caller (header read, pixels not): the pipeline checks its
    size before converting it. The file holds only the header, so decoding would fail."""
    full = tmp_path / "full.png"
    Image.new("1", (10_000, 10_000)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:64])
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's own warning, at open
        lazy = Image.open(cut)
    with pytest.raises(ValueError, match=r"too large \(10000 x 10000\)"):
        pipe.caption(lazy, max_new_tokens=4)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 20), "blue").save(small)
    small.write_bytes(small.read_bytes()[:-30])  # a readable header, truncated pixels
    with pytest.raises(ValueError, match="not a readable image"):
        pipe.caption(Image.open(small), max_new_tokens=4)
