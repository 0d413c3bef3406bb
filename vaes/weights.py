"""Model folders read from config.json + safetensors only, each failure one line naming the file.

`load_part(klass, folder)` is how every model part is loaded (diffusers `ModelMixin`s: the Text
VAE, the prior, an image VAE; transformers models of the baselines): the folder is checked
first (`check_folder`), then loaded with `use_safetensors=True`, so a folder that holds only
pickled weights (`.bin`, `.pt`, ...) is refused before anything is read, never unpickled. A
truncated or zero-byte `.safetensors`, a garbage or empty `config.json`, and weights that do
not match their config raise `ModelFileError` (a ValueError) naming the file or folder.
(In vaes/ because vaes/image_vae.py loads VAE folders too; vaes/ imports nothing of the rest.)
"""

from __future__ import annotations

import json
import logging
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ModelFileError(ValueError):
    """A file of a model folder is unreadable, truncated, pickled or does not match."""


def read_json(path: str | Path) -> Any:
    """A JSON file's content; ModelFileError naming the file when it is empty or not JSON."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if not raw.strip():
            raise ModelFileError(f"{path}: empty file (expected JSON)")
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None


def read_json_object(path: str | Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_safetensors(path: str | Path) -> int:
    """Check a safetensors file's header and that it holds every byte the header announces
    (a truncated or zero-byte file fails); returns the number of tensors. Reads the header
    only."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if size < 8:
                raise ValueError(f"{size} bytes")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"a {n}-byte header in a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        end = 8 + n + max(ends, default=0)
        if end != size:
            raise ValueError(f"{size} bytes, the header describes {end}")
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise ModelFileError(f"{path}: not a complete safetensors file ({e}; truncated or "
                             "corrupted?)") from None
    return len(ends)


def check_folder(folder: str | Path, weights: bool = True) -> Path:
    """A model part's folder: config.json is a JSON object and, with `weights`, the folder
    holds safetensors weights that are complete. Pickled weights alone are refused."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no model at {folder}: expected {config}")
    read_json_object(config)
    if not weights:
        return folder
    safe = sorted(folder.glob("*.safetensors"))
    if not safe:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
        if pickled:
            raise ModelFileError(
                f"{folder / pickled[0]}: pickled weights are never loaded (config.json + "
                f"safetensors only); save the model with safe serialization (safetensors) "
                f"into {folder}")
        raise FileNotFoundError(f"no weights in {folder}: expected a .safetensors file")
    for path in safe:
        check_safetensors(path)
    return folder


def load_part(klass, folder: str | Path, **kwargs):
    """`klass.from_pretrained(folder)` from safetensors only, after `check_folder`; any
    failure to build or fill the model (a config value of the wrong kind, weights of another
    shape, weights missing or left over) is a ModelFileError naming the folder."""
    folder = check_folder(folder)
    extra = {"low_cpu_mem_usage": False} if _is_diffusers(klass) else {}
    try:
        with _quiet():  # missing or left-over weights are reported below, as an error
            model, info = klass.from_pretrained(folder, use_safetensors=True,
                                                output_loading_info=True, **extra, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever the library says, it is this folder
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        raise ModelFileError(f"{folder / 'config.json'}: cannot load a {klass.__name__} from it "
                             f"and the weights beside it ({type(e).__name__}: "
                             f"{' '.join(lines[:2])[:300]})") from e
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            raise ModelFileError(f"{folder / 'config.json'}: the weights beside it do not match "
                                 f"it ({len(keys)} {kind.replace('_', ' ')}, e.g. {keys[0]})")
    return model


@contextmanager
def _quiet():
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _is_diffusers(klass) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in klass.__mro__)
