"""Broken model files and bad output paths on the command line: one line naming the file or
the option, exit code 2, before the work where possible; the next good command still works.
And the data skip handler counts bad samples, never code or config errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from unified.apps.cli import main
from unified.data.streams import SkipCounter, image_text_samples


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith(f"cola {argv[0]}: error: ") and "Traceback" not in err
    return lines[0]


def good_generate(capsys, checkpoint) -> None:
    assert main(["generate", "The function", "--checkpoint", str(checkpoint),
                 "--max-new-tokens", "4", "--steps", "2"]) == 0
    assert capsys.readouterr().out.startswith("The function")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _config(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


BROKEN = [  # (what, file to break, how, words the message must hold besides the file)
    ("truncated weights", "prior/diffusion_pytorch_model.safetensors", _truncate,
     "not a complete safetensors file"),
    ("zero-byte weights", "text_vae/diffusion_pytorch_model.safetensors",
     lambda p: p.write_bytes(b""), "not a complete safetensors file"),
    ("garbage config.json", "prior/config.json", lambda p: p.write_text("{width: 3"),
     "not valid JSON"),
    ("empty config.json", "text_vae/config.json", lambda p: p.write_text(""), "empty file"),
    ("weights of another shape", "prior/config.json", lambda p: _config(p, width=64),
     "cannot load a DiT"),
    ("weights missing layers", "prior/config.json", lambda p: _config(p, depth=3),
     "do not match it (11 missing keys"),
    ("a config value of the wrong type", "text_vae/config.json",
     lambda p: _config(p, width="wide"), "cannot load a TextVAE"),
    ("garbage model_index.json", "model_index.json", lambda p: p.write_bytes(b"\x00\xff"),
     "not valid JSON"),
    ("model_index.json a list", "model_index.json", lambda p: p.write_text("[]"),
     "expected a JSON object"),
    ("model_index.json naming another class", "model_index.json",
     lambda p: _config(p, prior=["os", "system"]), "prior must be ['prior.dit', 'DiT']"),
    ("garbage tokenizer.json", "tokenizer/tokenizer.json", lambda p: p.write_text('{"x": 1}'),
     "not a readable tokenizer"),
]


@pytest.mark.parametrize("what,name,breaker,words", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_model_file_is_one_line_naming_it(capsys, tmp_path, tiny_unified_checkpoint,
                                                   what, name, breaker, words):
    folder = tmp_path / "model"
    shutil.copytree(tiny_unified_checkpoint, folder)
    breaker(folder / name)
    named = folder / name
    for argv in (["generate", "hello"], ["export", str(folder), str(tmp_path / "out")]):
        if argv[0] == "generate":
            argv = [*argv, "--checkpoint", str(folder)]
        line = one_line_error(capsys, argv)
        assert str(named) in line and words in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    good_generate(capsys, tiny_unified_checkpoint)


def test_output_paths_are_checked_before_the_work(capsys, tmp_path, tiny_unified_checkpoint):
    """--checkpoint names no model: a message about the output shows it was checked first."""
    nothing = ["--checkpoint", str(tmp_path / "no-model")]
    (tmp_path / "dir.png").mkdir()
    line = one_line_error(capsys, ["imagine", "a red circle", "-o", str(tmp_path / "dir.png"),
                                   *nothing])
    assert f"--output {tmp_path / 'dir.png'} is a folder" in line
    line = one_line_error(capsys, ["imagine", "a red circle", "-o", "/proc/self/x.png", *nothing])
    assert "cannot write to the folder /proc/self" in line
    line = one_line_error(capsys, ["imagine", "a red circle", "-o", str(tmp_path / "o.png"),
                                   "--trajectory", str(tmp_path), *nothing])
    assert f"--trajectory {tmp_path} is a folder" in line
    (tmp_path / "file").write_text("x")
    line = one_line_error(capsys, ["train", "--preset", "text-tiny", "--stage", "1", "--out",
                                   str(tmp_path / "file")])
    assert f"--out {tmp_path / 'file'} is a file" in line
    line = one_line_error(capsys, ["train", "--preset", "text-tiny", "--stage", "1", "--out",
                                   str(tmp_path / "file" / "run")])
    assert f"{tmp_path / 'file'} is a file" in line
    line = one_line_error(capsys, ["make-shards", "text", "--default-corpus", "--output",
                                   str(tmp_path / "file")])
    assert "--output" in line and "is a file" in line
    assert (tmp_path / "file").read_text() == "x"
    out = tmp_path / "good.png"
    assert main(["imagine", "a red circle", "-o", str(out), "--steps", "2",
                 "--checkpoint", str(tiny_unified_checkpoint)]) == 0
    assert Image.open(out).size == (32, 32)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_the_skip_handler_counts_bad_data_but_raises_code_errors(tmp_path, monkeypatch):
    shard = tmp_path / "s-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "a", "png": _png("red"), "txt": "a red image"})
        w.write({"__key__": "b", "png": b"\x89PNG broken", "txt": "broken"})
        w.write({"__key__": "c", "png": _png("blue"), "txt": "a blue image"})
    skips = SkipCounter()
    keys = [s["key"] for s in image_text_samples(str(shard), image_size=16, skips=skips)]
    assert keys == ["a", "c"] and skips.total == 1  # bad data: skipped and counted
    skips = SkipCounter()
    import unified.data.records as records

    def bug(*args, **kwargs):  # a code error inside decoding (e.g. a wrong argument type)
        raise TypeError("model_input() got an unexpected argument")

    monkeypatch.setattr(records, "model_input", bug)
    with pytest.raises(TypeError) as err:  # not bad data: raised, not counted
        list(image_text_samples(str(shard), image_size=16, skips=skips))
    assert skips.total == 0
    assert any("not bad data" in note for note in getattr(err.value, "__notes__", []))
