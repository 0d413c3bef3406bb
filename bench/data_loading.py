"""Data loading: images/s from webdataset shards vs decoding the same images directly.

    python -m unified.cli make-shards shapes --n-train 5000 --n-heldout 100 --output /tmp/shapes
    python -m bench.data_loading --shards /tmp/shapes/train

Run it as a module from the checkout (`python -m bench...`). Three ways to the same tensors
([3, S, S] in [-1, 1]) from the same PNG files, all measured in this run:
- "direct": the PNG bytes already in memory (read from the tars beforehand, not timed); each
  image decoded with PIL, converted to RGB and to a tensor exactly as the pipeline does;
- "pipeline": unified.data.image_text_samples over the shards (tar reading, webdataset
  grouping and decoding, caption checks, the skip handler), in this process;
- "pipeline, N workers": the same pipeline in a torch DataLoader with N worker processes
  (each worker reads its own shards).
The ratio pipeline / direct is the cost of the shard format and the pipeline around the decode.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time

import numpy as np
import torch
from PIL import Image

from unified.data import expand_urls, image_text_samples
from unified.records import IMAGE_KEYS


def decode_direct(png: bytes, size: int) -> torch.Tensor:
    """What the pipeline does per image (unified.data._to_image_text), from bytes in memory."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1


def read_images(urls: list[str]) -> list[bytes]:
    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_KEYS:
                    out.append(tar.extractfile(m).read())
    return out


def rate(fn, n_expected: int) -> float:
    t0 = time.perf_counter()
    n = fn()
    dt = time.perf_counter() - t0
    if n != n_expected:
        raise RuntimeError(f"read {n} images, expected {n_expected}")
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="/tmp/shapes/train")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="*", default=[2])
    args = ap.parse_args()
    urls = expand_urls(args.shards)
    pngs = read_images(urls)
    n = len(pngs)
    size = Image.open(io.BytesIO(pngs[0])).size

    def direct() -> int:
        return sum(1 for b in pngs if decode_direct(b, args.size).shape[0] == 3)

    def pipeline() -> int:
        return sum(1 for s in image_text_samples(urls, image_size=args.size)
                   if s["image"].shape[0] == 3)

    def loader(workers: int):
        def run() -> int:
            ds = image_text_samples(urls, image_size=args.size)
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
            return sum(1 for s in dl if s["image"].shape[0] == 3)
        return run

    direct()  # warm-up (PIL plugins, allocator)
    rows = [("direct decode (bytes in memory)", rate(direct, n)),
            ("webdataset pipeline", rate(pipeline, n))]
    rows += [(f"webdataset pipeline, {w} workers", rate(loader(w), n)) for w in args.workers]
    print(f"{n} images ({size[0]}x{size[1]} PNG) in {len(urls)} shards -> [3, {args.size}, "
          f"{args.size}] tensors; {torch.get_num_threads()} threads")
    print(f"{'path':<38}{'images/s':>10}{'vs direct':>11}")
    for name, r in rows:
        print(f"{name:<38}{r:>10.0f}{r / rows[0][1]:>11.2f}")


if __name__ == "__main__":
    main()
