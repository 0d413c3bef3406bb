"""Aspect-ratio buckets (data.buckets): a shard of 4:1, portrait (one by EXIF rotation) and
square images; each image lands in the bucket nearest its aspect ratio, every batch holds one
bucket's shape, a rank's slices are exactly a single process's, and a tiny model trains both
stages on them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import TaskMixture
from unified.config import ConfigError, load_preset
from unified.data.buckets import bucket_sizes, image_shape, nearest
from unified.data.images import model_input
from unified.data.records import ImageRef
from unified.data.shards import write_image_text_shards
from unified.data.streams import SkipCounter
from unified.training.batches import Slicing, StepStream
from unified.training.trainer import Trainer

RATIOS = (0.5, 1.0, 4.0)  # width / height
WIDE, SQUARE, TALL = (16, 64), (32, 32), (48, 24)  # (height, width) at image.size 32, 8 px


def _picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    arr[h // 4: h // 2, w // 4: w // 2] = 255 - arr[0, 0]  # a block off center
    return Image.fromarray(arr)


def _rotated_jpeg(w: int, h: int) -> bytes:
    """A w x h JPEG whose EXIF orientation (6: rotate 90) makes it h x w as seen."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    _picture(w, h, 7).save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


KINDS = {"wide": ((128, 32), WIDE), "tall": ((40, 80), TALL), "square": ((50, 50), SQUARE),
         "turned": ((80, 40), TALL)}  # (width, height) stored -> the expected bucket


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    recs = []
    for i in range(48):
        kind = list(KINDS)[i % 4]
        (w, h), _ = KINDS[kind]
        image = _rotated_jpeg(w, h) if kind == "turned" else _picture(w, h, i)
        recs.append((f"{kind}-{i:03d}", image, f"a {kind} picture number {i % 7}", {}))
    write_image_text_shards(recs, root / "pairs", max_per_shard=24)
    return root / "pairs"


def config(shards, *extra):
    return load_preset("shapes-tiny", [
        f'data.pairs="{shards}"', "data.batch_size=0", "data.shuffle_buffer=10",
        f"data.buckets={list(RATIOS)}", "tasks.question_prob=0.0", *extra])


def test_bucket_sizes_and_the_nearest_bucket():
    sizes = bucket_sizes(RATIOS, 32, 8)
    assert sizes == [TALL, SQUARE, WIDE]
    assert all(h % 8 == 0 and w % 8 == 0 and 0.7 < h * w / 32**2 < 1.3 for h, w in sizes)
    assert nearest(sizes, 128, 32) == WIDE and nearest(sizes, 40, 80) == TALL
    assert nearest(sizes, 50, 52) == SQUARE and nearest(sizes, 1000, 10) == WIDE
    assert bucket_sizes((1.0, 1.0), 32, 8) == [SQUARE]
    for bad in (0.0, -1.0, 100.0):
        with pytest.raises(ValueError, match="data.buckets"):
            bucket_sizes((bad,), 32, 8)
    assert image_shape(_rotated_jpeg(80, 40)) == (40, 80)  # EXIF orientation applied
    assert image_shape(b"not an image") is None


def test_config_keeps_buckets_typed():
    assert load_preset("shapes-tiny").data.buckets == ()  # off by default
    assert load_preset("shapes-tiny", ["data.buckets=[0.5, 1, 2]"]).data.buckets == (0.5, 1.0,
                                                                                      2.0)
    with pytest.raises(ConfigError, match="data.buckets"):
        load_preset("shapes-tiny", ['data.buckets="wide"'])


def test_preprocessing_covers_and_crops_a_bucket():
    img = _picture(128, 32, 0)
    x = model_input(img, (16, 64))
    assert x.shape == (3, 16, 64) and x.min() >= -1 and x.max() <= 1
    # the whole 4:1 picture scaled (nothing cropped): the block sits where it was
    y = model_input(img, (16, 64), train=True, seed=3)
    assert torch.equal(x, y)
    assert model_input(_picture(40, 80, 1), TALL, train=True, seed=5).shape == (3, 48, 24)
    sq = _picture(50, 70, 2)  # a square (height, width) is the square path, pixel for pixel
    assert torch.equal(model_input(sq, (32, 32), train=True, seed=9),
                       model_input(sq, 32, train=True, seed=9))
    ref = ImageRef(_rotated_jpeg(80, 40))
    assert ref.decode(TALL).shape == (3, 48, 24)


def _stream(c, tok, rank=0, world=1):
    mix = TaskMixture(c)
    return StepStream(None, lambda: mix.samples(tok, 0, SkipCounter("pairs")),
                      Slicing(rank, world, 1, 0, c.data.pair_batch_size), seed=0, start=0,
                      seq_len=c.data.seq_len, pad_id=tok.pad_token_id, image_size=32,
                      buckets=bucket_sizes(c.data.buckets, 32, 8))


def test_batches_hold_one_bucket_and_ranks_cut_a_single_process_batch(shards,
                                                                      unified_tokenizer):
    c = config(shards)
    one, ranks = _stream(c, unified_tokenizer), [_stream(c, unified_tokenizer, r, 2)
                                                  for r in (0, 1)]
    seen = set()
    for pos, batch in zip(range(8), one.global_batches()):
        size = batch["size"]
        seen.add(size)
        for smp in batch["pairs"]:  # every image in the bucket of its own aspect ratio
            assert KINDS[smp.images[0].key.split("-")[0]][1] == size
        [mb] = one.cut(pos, batch)
        assert mb["pairs"]["images"].shape[-2:] == size  # uniform: the images stack
        halves = [s.cut(pos, b)[0] for s, b in zip(ranks, (batch, batch))]
        assert [h["pairs"]["images"].shape[0] for h in halves] == [2, 2]
        assert torch.equal(torch.cat([h["pairs"]["images"] for h in halves]),
                           mb["pairs"]["images"])
        assert sum(s.decoded for s in ranks) == one.decoded  # each rank decodes its share
    assert seen == {WIDE, TALL, SQUARE}
    assert one.decoded == 8 * 4


def test_a_tiny_model_trains_on_buckets(shards, tmp_path):
    c = config(shards, "stage1.steps=3", "stage2.steps=3", "stage2.ckpt_every=1000",
               "stage2.log_samples_every=0")
    t1 = Trainer(c, 1, tmp_path / "s1", tasks=TaskMixture(c))
    shapes = set()
    for _, item in zip(range(6), t1._batches()):  # what the loop trains on
        imgs = item["micro"][0]["pairs"]["images"]
        shapes.add(tuple(imgs.shape[-2:]))
    assert shapes <= {WIDE, TALL, SQUARE} and len(shapes) >= 2
    h1 = t1.train()
    assert len(h1) == 3 and all(np.isfinite(h["loss"]) for h in h1)
    t2 = Trainer(c, 2, tmp_path / "s2", init=tmp_path / "s1" / "final", tasks=TaskMixture(c))
    h2 = t2.train()
    assert len(h2) == 3 and all(np.isfinite(h["loss"]) and h["fm"] > 0 for h in h2)
    assert (tmp_path / "s2" / "final" / "model_index.json").is_file()
