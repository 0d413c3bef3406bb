"""Data loading for training: images/s through the trainer's own data path vs a bare decode.

    python -m bench.data_loading --make /tmp/jpeg-shards --n 512        # JPEG shards, 320-768 px
    python -m bench.data_loading --shards /tmp/jpeg-shards --size 256 --workers 0 1 2 \\
        --batch 32 --step-seconds 0.5

Run it as a module from the checkout. All rows produce the same tensors ([3, S, S] in [-1, 1],
shorter side resized to S and a random crop, unified/data/images.py) from the same JPEG bytes:
- "bare decode": the bytes already in memory (read from the tars beforehand, not timed),
  each decoded exactly as training does (ImageRef.decode: reduced-scale JPEG decode, EXIF,
  resize, crop) and nothing else;
- "training stream, N workers": unified.training.batches.StepStream as the trainer builds it
  for one rank (records read from the tars, captions checked and tokenized, the task mixture,
  the images of the rank's slice decoded, samples collated), in this process (0) or in a
  torch DataLoader with N worker processes (each decodes every N-th step).
With --step-seconds T, "one training step" is the rate a step of --batch images every T
seconds consumes: the loader keeps up when its images/s is above it.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from unified.data.records import IMAGE_KEYS, ImageRef
from unified.data.streams import expand_urls
from unified.training.batches import Slicing, StepStream

WORDS = "red green blue yellow circle square triangle small large top left bottom right".split()


def make_shards(out: Path, n: int, per_shard: int = 128, seed: int = 0) -> list[str]:
    """JPEG photos-like images (smooth gradients and shapes, 320 to 768 px a side, mixed
    aspect ratios) with captions and img2dataset-style .json metadata."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, n, per_shard):
        path = out / f"{start // per_shard:05d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(start, min(n, start + per_shard)):
                wd, ht = (int(x) for x in rng.integers(320, 769, 2))
                yy, xx = np.mgrid[0:ht, 0:wd]
                base = rng.integers(0, 256, 3)
                arr = (base + 0.3 * xx[..., None] + 0.2 * yy[..., None]) % 256
                img = Image.fromarray(arr.astype(np.uint8))
                d = ImageDraw.Draw(img)
                for _ in range(4):
                    x, y = int(rng.integers(0, wd - 60)), int(rng.integers(0, ht - 60))
                    d.ellipse([x, y, x + 60, y + 60], fill=tuple(int(c) for c in
                                                                 rng.integers(0, 256, 3)))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                w.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(),
                         "txt": " ".join(rng.choice(WORDS, 8)),
                         "json": f'{{"width": {wd}, "height": {ht}}}'.encode()})
        paths.append(str(path))
    return paths


def read_images(urls: list[str]) -> list[bytes]:
    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_KEYS:
                    out.append(tar.extractfile(m).read())
    return out


def training_stream(shards: str, size: int, batch: int) -> StepStream:
    """The trainer's stream for one rank (unified/training/trainer.py Trainer._stream), stage 2."""
    from tasks import TaskMixture
    from unified.config import load_preset
    from vaes.tokenizer import train_tokenizer

    cfg = load_preset("t2i-256-smoke", [f'data.pairs="{shards}"', f"image.size={size}",
                                        f"data.pair_batch_size={batch}",
                                        "data.shuffle_buffer=100"])
    mix = TaskMixture(cfg)
    tok = train_tokenizer(mix.texts(200), vocab_size=400)
    return StepStream(None, lambda: mix.samples(tok, 0), Slicing(pairs=batch), seed=0, start=0,
                      seq_len=cfg.data.seq_len, pad_id=tok.pad_token_id, image_size=size)


def rate_of(items, n_steps: int) -> float:
    """Images/s over n_steps items (after a first, untimed one: workers start, buffers fill)."""
    it = iter(items)
    next(it)
    t0 = time.perf_counter()
    images = sum(next(it)["decoded"] for _ in range(n_steps))
    return images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", type=Path, help="write JPEG shards to this folder and exit")
    ap.add_argument("--n", type=int, default=512, help="--make: images")
    ap.add_argument("--shards", default="/tmp/jpeg-shards")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="images per step (one rank)")
    ap.add_argument("--steps", type=int, default=8, help="steps timed per row")
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--step-seconds", type=float, help="a training step's time (its images/s)")
    args = ap.parse_args()
    if args.make:
        print(f"wrote {len(make_shards(args.make, args.n))} shards to {args.make}")
        return
    urls = expand_urls(args.shards)
    jpegs = read_images(urls)

    def bare() -> float:
        t0 = time.perf_counter()
        for i, raw in enumerate(jpegs):
            ImageRef(raw).decode(args.size, train=True, seed=i)
        return len(jpegs) / (time.perf_counter() - t0)

    bare()  # warm-up (decoders, allocator)
    rows = [("bare decode (bytes in memory)", bare())]
    for w in args.workers:
        stream = training_stream(args.shards, args.size, args.batch)
        items = stream if w == 0 else torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=w, prefetch_factor=2)
        rows.append((f"training stream, {w} workers", rate_of(items, args.steps)))
    if args.step_seconds:
        rows.append((f"one training step ({args.batch} images / {args.step_seconds} s)",
                     args.batch / args.step_seconds))
    sizes = [Image.open(io.BytesIO(b)).size for b in jpegs[:64]]
    print(f"{len(jpegs)} JPEG images ({min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} "
          f"px) in {len(urls)} shards -> [3, {args.size}, {args.size}]; batch {args.batch}; "
          f"{torch.get_num_threads()} threads")
    print(f"{'path':<48}{'images/s':>10}{'vs bare':>9}")
    for name, r in rows:
        print(f"{name:<48}{r:>10.0f}{r / rows[0][1]:>9.2f}")


if __name__ == "__main__":
    main()
