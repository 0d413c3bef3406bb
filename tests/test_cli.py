"""The `cola` command line, in-process: user errors are one readable line (exit 2), no traceback."""

from __future__ import annotations

import json

import pytest

from unified.apps.cli import main
from unified.config import preset_names
from unified.data.streams import text_samples


def run_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error; return its one stderr line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith(f"cola {argv[0]}: error: "), line
    return line


def test_generate_missing_checkpoint(capsys, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    line = run_error(capsys, ["generate", "hello", "--checkpoint", str(missing)])
    assert str(missing) in line
    assert "model_index.json" in line  # says what it expected to find there


def test_generate_bad_sampler_value(capsys, tmp_path):
    line = run_error(capsys, ["generate", "hello", "--checkpoint", str(tmp_path), "--steps", "0"])
    assert "steps" in line


def test_train_unknown_preset(capsys, tmp_path):
    out = tmp_path / "run"
    line = run_error(capsys, ["train", "--preset", "no-such-preset", "--stage", "1", "--out", str(out)])
    assert "no-such-preset" in line
    names = preset_names()
    assert "text-tiny" in names
    for name in names:
        assert name in line, f"available presets are listed: {line}"
    assert not out.exists()


def test_train_unknown_config_key(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--preset", "text-tiny", "--stage", "1", "--out", str(out), "--set", "optim.nope=1"]
    line = run_error(capsys, argv)
    assert "unknown config key" in line and "'nope'" in line
    assert "lr" in line  # lists the known keys of that section
    assert not out.exists(), "nothing is trained or written on a bad override"


def test_train_unknown_section_and_malformed_override(capsys, tmp_path):
    base = ["train", "--preset", "text-tiny", "--stage", "1", "--out", str(tmp_path / "run")]
    line = run_error(capsys, [*base, "--set", "nosection.x=1"])
    assert "nosection" in line and "optim" in line
    line = run_error(capsys, [*base, "--set", "optim.lr"])
    assert "optim.lr" in line and "=" in line


@pytest.mark.parametrize("override", ["vae=3", "optim.lr.x=1"])
def test_train_override_shape_mismatch_is_a_user_error(capsys, tmp_path, override):
    """Overriding a whole section with a scalar, or descending into a scalar, is a typo in the
    input and must be reported like any other bad key (not an AttributeError/TypeError trace)."""
    argv = ["train", "--preset", "text-tiny", "--stage", "1", "--out", str(tmp_path / "run"),
            "--set", override]
    line = run_error(capsys, argv)
    assert override.split("=")[0].split(".")[0] in line


def test_train_stage2_needs_init(capsys, tmp_path):
    line = run_error(capsys, ["train", "--preset", "text-tiny", "--stage", "2", "--out", str(tmp_path / "r")])
    assert "init" in line


def test_make_shards_missing_input(capsys, tmp_path):
    missing = tmp_path / "missing.txt"
    out = tmp_path / "shards"
    line = run_error(capsys, ["make-shards", "text", str(missing), "--output", str(out)])
    assert str(missing) in line and "not found" in line
    assert not out.exists() or not list(out.glob("*.tar")), "no shard written for a bad input"


def test_make_shards_no_inputs(capsys, tmp_path):
    line = run_error(capsys, ["make-shards", "text", "--output", str(tmp_path / "s")])
    assert "--default-corpus" in line


def test_make_shards_unsupported_type(capsys, tmp_path):
    bad = tmp_path / "table.csv"
    bad.write_text("a,b\n")
    line = run_error(capsys, ["make-shards", "text", str(bad), "--output", str(tmp_path / "s")])
    assert "table.csv" in line and ".txt" in line


def test_make_shards_writes_readable_shards(capsys, tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("First paragraph of the text file.\nStill the first.\n\n  \nSecond paragraph here.\n")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"text": "a json line"}) + "\n\n" + json.dumps({"text": "another ünïcode line"})
                 + "\n")
    out = tmp_path / "shards"
    code = main(["make-shards", "text", str(a), str(b), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    assert "wrote 1 shard(s)" in captured.out
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["text-000000.tar"]
    texts = list(text_samples(str(out)))
    assert texts == [
        "First paragraph of the text file.\nStill the first.",
        "Second paragraph here.",
        "a json line",
        "another ünïcode line",
    ]
