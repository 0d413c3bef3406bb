"""demo/files.py: result images as whole, content-named PNG files."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from demo.files import ImageFiles


def test_same_pixels_same_file_and_atomic_concurrent_saves(tmp_path):
    files = ImageFiles(tmp_path)
    red = Image.new("RGB", (32, 32), "red")
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: files.save(red), range(32)))
    assert len(set(paths)) == 1
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(red))
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(paths[0]).name], "no temp left"
    blue = files.save(Image.new("RGB", (32, 32), "blue"), "other")
    assert blue != paths[0] and Path(blue).name.startswith("other-")


def test_prune_removes_only_old_files(tmp_path):
    files = ImageFiles(tmp_path, max_age=60)
    old = Path(files.save(Image.new("RGB", (4, 4), "red")))
    new = Path(files.save(Image.new("RGB", (4, 4), "blue")))
    past = time.time() - 120
    os.utime(old, (past, past))
    assert files.prune() == 1
    assert not old.exists() and new.exists()
    again = Path(files.save(Image.new("RGB", (4, 4), "red")))
    assert again == old and again.exists()
