"""Result images as PNG files, and the folders a file parameter may name.

Result images are PNG files, written so that concurrent requests cannot see half a file.

Gradio caches a returned PIL image by rewriting `<cache>/<hash of its bytes>/image.png` in
place, so when two requests produce the same image at once (two users clicking the same
example with the same seed), one client can download the file while the other request is
rewriting it and receive a truncated body. Returned *file paths* are copied into Gradio's cache
under a temporary name and renamed into place, which is safe. So the demo hands Gradio paths,
written the same way here: one file per distinct content, named by its hash, written to a
temporary name and renamed (os.replace is atomic), and pruned after `max_age` seconds.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image


class ImageFiles:
    """PNG files of result images in one folder (a fresh temporary one by default, removed
    when the process exits)."""

    def __init__(self, folder: str | Path | None = None, max_age: float = 3600.0):
        if folder is None:
            folder = tempfile.mkdtemp(prefix="cola-demo-images-")
            atexit.register(shutil.rmtree, folder, True)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_age = max_age

    def save(self, image: Image.Image, stem: str = "cola") -> str:
        """The path of a PNG holding `image` (the same path for the same pixels)."""
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        path = self.folder / f"{stem}-{hashlib.sha256(data).hexdigest()[:16]}.png"
        if path.exists():
            os.utime(path)  # in use again: not pruned for another max_age
            return str(path)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(path)

    def prune(self) -> int:
        """Remove files not used for `max_age` seconds; returns how many."""
        cutoff, removed = time.time() - self.max_age, 0
        for p in self.folder.glob("*.png"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:  # pruned by a concurrent call
                pass
        return removed


# --------------------------------------------------------------------------- file parameters
REFUSED_PATH = "the image must be uploaded (a path on the server is not accepted)"


def _inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def input_folders() -> list[str]:
    """Where a file parameter may point: Gradio's upload folder (uploads, and the cached
    copies of the examples) and the folders the running app serves (the example images)."""
    from gradio.context import LocalContext
    from gradio.utils import get_upload_folder

    blocks = LocalContext.blocks.get(None)
    return [get_upload_folder(), *(getattr(blocks, "allowed_paths", None) or [])]


def confined_path(path: Any, folders: list[str]) -> str:
    """`path` (symbolic links resolved) if it lies inside one of `folders`, else ValueError
    with one message whatever the path is: it does not tell whether the path exists, is a
    folder or is not an image. A file parameter sent without Gradio's `meta` field skips
    Gradio's own check and would otherwise be opened as it is."""
    try:
        if not isinstance(path, str) or not path or "\0" in path or "://" in path:
            raise ValueError
        real = os.path.realpath(path)
        if not any(_inside(real, f) for f in folders):
            raise ValueError
    except (ValueError, OSError):
        raise ValueError(REFUSED_PATH) from None
    return real
