"""Bad image-text data in training: every case is counted and the run goes on, or the run
stops with one line naming the shard and the cause; never a traceback, never an endless loop.

Shards are real webdataset tars in the img2dataset layout with real JPEG/PNG bytes of mixed
sizes; the trainer is the tiny unified preset on the CPU (stage 1: both VAEs, a few steps)."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tasks import TaskMixture
from unified.apps.cli import main
from unified.config import load_preset
from unified.training.trainer import Trainer

WORDS = "red green blue circle square triangle small large top left bottom right center".split()


def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(i)
    w, h = [(48, 32), (32, 64), (40, 40), (96, 24)][i % 4]  # mixed sizes and aspect ratios
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def caption(i: int, words: int = 6) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, words))


def write(path, samples) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def good(i: int, **extra) -> dict:
    fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
    return {"__key__": f"{i:06d}", ext: image_bytes(i, fmt), "txt": caption(i),
            "json": json.dumps({"url": f"http://example.com/{i}.jpg", "width": 48,
                                "height": 32, "status": "success"}).encode(), **extra}


def cfg(pairs, *extra):
    spec = json.dumps(pairs if isinstance(pairs, dict) else str(pairs))  # a dict: mixed sources
    return load_preset("shapes-tiny", [f"data.pairs={spec}", "data.batch_size=0",
                                       "data.pair_batch_size=4", "data.shuffle_buffer=0",
                                       "stage1.steps=3", "stage1.log_every=1",
                                       "stage1.ckpt_every=1000", "data.max_bad_samples=20",
                                       *extra])


def train(c, out):
    t = Trainer(c, 1, out, tasks=TaskMixture(c))
    return t, t.train()


def cli_train(pairs, out, capsys, *extra) -> tuple[int, str]:
    sets = [a for o in [f"data.pairs={json.dumps(str(pairs))}", "data.batch_size=0",
                        "data.pair_batch_size=4", "stage1.steps=3", "data.max_bad_samples=20",
                        *extra] for a in ("--set", o)]
    rc = main(["train", "--preset", "shapes-tiny", "--stage", "1", "--out", str(out), *sets])
    return rc, capsys.readouterr().err


def test_over_long_captions_are_truncated_or_skipped_and_counted(tmp_path):
    long = "a large red circle at the top left and " * 40  # ~400 tokens; 48 fit
    shard = write(tmp_path / "d" / "p-000000.tar",
                  [good(i, txt=long if i % 4 == 0 else caption(i)) for i in range(40)])
    t, hist = train(cfg(shard), tmp_path / "truncate")
    assert len(hist) == 3 and hist[-1]["captions_truncated"] > 0 and t.skipped == 0
    c = cfg(shard)
    mix = TaskMixture(c)
    for _, smp in zip(range(30), mix.samples(t.model.tokenizer, 0)):
        assert all(len(ids) <= c.data.seq_len for ids in smp.texts)
    t, hist = train(cfg(shard, 'data.long_captions="skip"'), tmp_path / "skip")
    assert len(hist) == 3 and t.skips["pairs"].counts["CaptionTooLongError"] > 0
    assert hist[-1]["skipped"] == t.skipped and hist[-1]["captions_truncated"] == 0


def test_captions_only_in_json_stop_with_a_hint_or_train_with_caption_key(tmp_path, capsys):
    samples = []
    for i in range(30):
        s = good(i)
        meta = json.loads(s.pop("txt") and s["json"])
        s["json"] = json.dumps({**meta, "caption": caption(i)}).encode()
        samples.append(s)
    shard = write(tmp_path / "d" / "j-000000.tar", samples)
    rc, err = cli_train(shard, tmp_path / "txt", capsys)
    assert rc == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("cola train: error")]
    assert len(line) == 1 and "j-000000.tar" in line[0] and "caption_key" in line[0]
    assert "MissingTextError" in line[0]
    t, hist = train(cfg(shard, 'data.caption_key="caption"'), tmp_path / "json")
    assert len(hist) == 3 and t.skipped == 0


def test_an_all_bad_shard_stops_alone_and_is_counted_among_good_ones(tmp_path, capsys):
    bad = write(tmp_path / "bad" / "b-000000.tar",
                [{"__key__": f"{i:06d}", "jpg": b"\xff\xd8\xff\xe0 not a jpeg" * 20,
                  "txt": caption(i)} for i in range(40)])
    rc, err = cli_train(bad, tmp_path / "alone", capsys, "stage1.steps=10")
    assert rc == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("cola train: error")][0]
    assert "b-000000.tar" in line and "ImageDecodeError" in line and "in a row" in line
    good_shard = write(tmp_path / "mixed" / "g-000000.tar", [good(i) for i in range(40)])
    c = cfg({good_shard: 0.8, bad: 0.2}, "stage1.steps=4")
    t, hist = train(c, tmp_path / "mixed-run")
    assert len(hist) == 4 and t.skips["images"].counts["ImageDecodeError"] > 0
    assert hist[-1]["skipped"] == t.skipped > 0


def test_a_truncated_shard_is_counted_and_training_goes_on(tmp_path):
    whole = write(tmp_path / "d" / "a-000000.tar", [good(i) for i in range(30)])
    raw = open(whole, "rb").read()
    (tmp_path / "d" / "a-000001.tar").write_bytes(raw[: len(raw) // 2 + 77])
    t, hist = train(cfg(tmp_path / "d", "stage1.steps=6"), tmp_path / "run")
    assert len(hist) == 6 and t.skips["pairs"].total >= 1


def test_garbage_and_real_metadata_never_break_shapes_only_questions(tmp_path):
    samples = []
    for i in range(40):
        s = good(i)
        if i % 3 == 1:
            s["json"] = b"{not json at all"
        elif i % 3 == 2:
            s["json"] = b"[1, 2, 3]"
        samples.append(s)
    shard = write(tmp_path / "d" / "m-000000.tar", samples)
    t, hist = train(cfg(shard, "tasks.question_prob=0.9"), tmp_path / "run")
    assert len(hist) == 3 and t.skipped == 0
    assert hist[-1]["metadata_ignored"] > 0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_mixed_formats_and_sizes_decode_to_the_training_size(fmt):
    from unified.data.records import ImageRef

    for i in range(4):
        x = ImageRef(image_bytes(i, fmt)).decode(32, train=True, seed=i)
        assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
