"""`cola caption`, `cola imagine` and `cola demo` in-process on the tiny unified model: results
on good input, one readable line (exit 2) on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from demo.examples import load_examples
from unified.apps.cli import main
from unified.apps.cli_tasks import trajectory_strip


def run_ok(capsys, argv: list[str]) -> tuple[str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


def run_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"cola {argv[0]}: error: "), lines[0]
    return lines[0]


def test_caption_prints_the_caption_and_its_cost(capsys, tiny_unified_checkpoint):
    image = load_examples().images[0].path
    out, err = run_ok(capsys, ["caption", str(image), "--checkpoint", str(tiny_unified_checkpoint),
                               "--prefix", "a large", "--steps", "4", "--max-new-tokens", "8"])
    assert out.startswith("a large") and len(out.strip()) > len("a large")
    assert "model evaluations" in err
    again, _ = run_ok(capsys, ["caption", str(image), "--checkpoint", str(tiny_unified_checkpoint),
                               "--prefix", "a large", "--steps", "4", "--max-new-tokens", "8"])
    assert again == out, "same seed, same caption"
    best, err = run_ok(capsys, ["caption", str(image), "--checkpoint",
                                str(tiny_unified_checkpoint), "--steps", "2",
                                "--max-new-tokens", "8", "--candidates", "3"])
    plain = {run_ok(capsys, ["caption", str(image), "--checkpoint", str(tiny_unified_checkpoint),
                             "--steps", "2", "--max-new-tokens", "8", "--seed", str(s)])[0]
             for s in range(3)}
    assert best in plain and "model evaluations" in err


def test_imagine_writes_the_image_and_the_trajectory(capsys, tmp_path, tiny_unified_checkpoint):
    out_png, strip_png = tmp_path / "out.png", tmp_path / "strip.png"
    out, _ = run_ok(capsys, ["imagine", "a large red circle at the top left", "-o", str(out_png),
                             "--trajectory", str(strip_png), "--frames", "4", "--steps", "8",
                             "--checkpoint", str(tiny_unified_checkpoint)])
    image = Image.open(out_png)
    assert image.size == (32, 32)
    strip = Image.open(strip_png)
    n = (strip.width + 2) // (32 * 4 + 2)
    assert 4 <= n <= 5 and strip.height == 128
    last = np.asarray(strip.convert("RGB"))[:, -128:]
    assert np.array_equal(last, np.asarray(image.convert("RGB").resize((128, 128), Image.NEAREST)))
    assert f"wrote {out_png} (32 x 32)" in out and "model evaluations" in out


def test_trajectory_strip_layout():
    frames = [Image.new("RGB", (2, 2), c) for c in ("red", "blue")]
    strip = trajectory_strip(frames, scale=3, gap=1)
    assert strip.size == (13, 6)
    assert strip.getpixel((0, 0)) == (255, 0, 0) and strip.getpixel((6, 0)) == (255, 255, 255)
    assert strip.getpixel((7, 5)) == (0, 0, 255)


@pytest.fixture(scope="module")
def not_an_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "notes.png"
    path.write_text("this is text\n")
    return path


def test_caption_bad_input(capsys, tmp_path, tiny_unified_checkpoint, not_an_image):
    ck = ["--checkpoint", str(tiny_unified_checkpoint)]
    line = run_error(capsys, ["caption", str(tmp_path / "missing.png"), *ck])
    assert "no such image file" in line and "missing.png" in line
    line = run_error(capsys, ["caption", str(not_an_image), *ck])
    assert "not a readable image" in line and "notes.png" in line
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(huge)
    assert "too large" in run_error(capsys, ["caption", str(huge), *ck])
    image = str(load_examples().images[0].path)
    assert "guidance" in run_error(capsys, ["caption", image, *ck, "--guidance", "nan"])
    assert "steps" in run_error(capsys, ["caption", image, *ck, "--steps", "0"])
    assert "candidates" in run_error(capsys, ["caption", image, *ck, "--candidates", "0"])
    assert "temperature" in run_error(capsys, ["caption", image, *ck, "--temperature", "inf"])
    assert "noise_scale" in run_error(capsys, ["caption", image, *ck, "--noise-scale", "-1"])
    line = run_error(capsys, ["caption", image, *ck, "--question", "q" * 3000])
    assert "question is too long" in line


def test_imagine_bad_input(capsys, tmp_path, tiny_unified_checkpoint):
    ck = ["--checkpoint", str(tiny_unified_checkpoint)]
    out = str(tmp_path / "out.png")
    assert "prompt is empty" in run_error(capsys, ["imagine", " ", "-o", out, *ck])
    line = run_error(capsys, ["imagine", "a red circle", "-o", str(tmp_path / "out.xyz"), *ck])
    assert "unknown image type .xyz" in line
    line = run_error(capsys, ["imagine", "a red circle", "-o", str(tmp_path / "no" / "o.png"), *ck])
    assert "does not exist" in line
    assert "guidance" in run_error(capsys, ["imagine", "a red circle", "-o", out, *ck,
                                            "--guidance", "nan"])
    assert "shift" in run_error(capsys, ["imagine", "a red circle", "-o", out, *ck, "--shift", "0"])
    assert "seed" in run_error(capsys, ["imagine", "a red circle", "-o", out, *ck, "--seed", "-3"])
    assert not (tmp_path / "out.png").exists(), "nothing is written on bad input"


@pytest.mark.parametrize("argv,words", [
    (["imagine", "a red circle", "-o", "x.png", "--steps", "many"], ["--steps", "invalid int"]),
    (["caption"], ["image"]),
    (["demo", "--port", "http"], ["--port", "invalid int"]),
])
def test_usage_errors_are_one_line(capsys, argv, words):
    line = run_error(capsys, argv)
    assert all(w in line for w in words), line
    assert f"see cola {argv[0]} --help" in line


def test_text_only_checkpoint_cannot_caption(capsys, tmp_path, text_only_checkpoint):
    image = str(load_examples().images[0].path)
    line = run_error(capsys, ["caption", image, "--checkpoint", str(text_only_checkpoint)])
    assert "no image side" in line
    line = run_error(capsys, ["imagine", "a red circle", "-o", str(tmp_path / "o.png"),
                              "--checkpoint", str(text_only_checkpoint)])
    assert "no image side" in line


@pytest.mark.parametrize("flag,value", [("--port", "70000"), ("--concurrency", "0"),
                                        ("--max-queue", "-1")])
def test_demo_bad_settings(capsys, flag, value):
    line = run_error(capsys, ["demo", flag, value])
    assert flag in line and value in line


def test_demo_refuses_a_busy_port(capsys, tiny_unified_checkpoint):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = run_error(capsys, ["demo", "--checkpoint", str(tiny_unified_checkpoint),
                                  "--port", str(port)])
    assert f"cannot serve on 127.0.0.1:{port}" in line


@pytest.mark.parametrize("argv,word", [
    (["caption", "IMAGE", "--steps", "0"], "steps"),
    (["caption", "IMAGE", "--question", "q" * 3000], "question"),
    (["imagine", "a red circle", "-o", "OUT", "--guidance", "nan"], "guidance"),
    (["imagine", "a red circle", "-o", "OUT", "--trajectory", "OUT", "--frames", "0"], "--frames"),
    (["generate", "hello", "--top-p", "nan"], "top_p"),
])
def test_bad_numbers_fail_before_the_model_loads(capsys, tmp_path, argv, word):
    image = str(load_examples().images[0].path)
    argv = [image if a == "IMAGE" else str(tmp_path / "o.png") if a == "OUT" else a for a in argv]
    line = run_error(capsys, [*argv, "--checkpoint", str(tmp_path / "no-model")])
    assert word in line and "no Cola model" not in line, line


def test_generate_noise_scale(capsys, tiny_unified_checkpoint):
    """--noise-scale reaches the flow: at 0 two seeds write the same continuation."""
    ck = ["--checkpoint", str(tiny_unified_checkpoint)]
    outs = []
    for seed in ("1", "2"):
        assert main(["generate", "The function", *ck, "--max-new-tokens", "6", "--steps", "2",
                     "--noise-scale", "0", "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("The function")
    assert "noise_scale" in run_error(capsys, ["generate", "x", *ck, "--noise-scale", "nan"])
