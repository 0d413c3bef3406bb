"""Training checkpoints as safetensors + JSON (never pickle), written atomically.

A checkpoint folder `step-00001234/` holds:
  model/            the model folder (ColaModel.save_pretrained; a frozen pretrained image VAE
                    as its config + a reference to the weights in its folder, not a copy)
  ref_vae/          the frozen reference encoder (stage 2)
  ema_prior/        the EMA of the prior (stage 2, when enabled)
  optimizer.safetensors + optimizer.json   tensors and the rest of the optimizer state
  trainer.safetensors + trainer.json       RNG states; step, data position, scheduler, config
  manifest.json     the size and sha256 of every other file, recorded when it was written
It is written as `.step-00001234.tmp/`, every file and folder fsynced, and renamed when
complete, so neither a kill nor a power loss mid-write leaves a broken checkpoint under a final
name; `latest_checkpoint` ignores temporary folders. A file damaged later (a truncated copy, a
full disk, bit rot) is found by `damage` (every file present, sizes and hashes as recorded;
for an older checkpoint without a manifest, every JSON and safetensors file parses), and
`--resume auto` falls back to the newest undamaged checkpoint (`latest_valid_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vaes.weights import ModelFileError, check_safetensors, read_json

STEP_PREFIX = "step-"
MANIFEST = "manifest.json"
log = logging.getLogger("cola.checkpoint")


def optimizer_to_flat(opt: torch.optim.Optimizer, local=lambda t: t
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able metadata.
    `local` maps a (sharded) state tensor to the tensor to store."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{key}"] = local(val).detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict,
                        convert=lambda pid, t: t) -> None:
    """Inverse of optimizer_to_flat; `convert(param index, tensor)` rebuilds sharded state."""
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = convert(int(pid), val)
    for name, val in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def checkpoint_dirs(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(temporary folder, final folder) names of checkpoint `step`."""
    final = Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"
    return final.with_name(f".{final.name}.tmp"), final


def begin_checkpoint(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(temporary folder, final folder) of checkpoint `step`; the temporary one is fresh."""
    tmp, final = checkpoint_dirs(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp, final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def write_manifest(folder: Path) -> dict:
    """Hash and fsync every file of `folder`, write manifest.json (size and sha256 of each),
    then fsync it and every folder of the tree."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size,
                                                       "sha256": _sha256(p, fsync=True)}
    manifest = {"version": 1, "files": files}
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        _fsync(d)
    _fsync(folder)
    return manifest


def finish_checkpoint(run_dir: Path, tmp: Path, final: Path, *, trainer_state: dict,
                      rng: dict[str, torch.Tensor], keep: int) -> Path:
    """Write the trainer state last and the manifest, fsync, rename the folder into place,
    prune to `keep`."""
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "trainer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # atomic on one filesystem
    _fsync(final.parent)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(run_dir: Path, step: int, *, model, optimizer, trainer_state: dict,
                    rng: dict[str, torch.Tensor], keep: int, extra: dict | None = None) -> Path:
    """Write checkpoint `step` of an unsharded model atomically and prune to `keep`."""
    tmp, final = begin_checkpoint(run_dir, step)
    if hasattr(model, "image_vae_linkable"):  # a frozen pretrained image VAE: referred to
        model.save_pretrained(tmp / "model", link_image_vae=True)
    else:
        model.save_pretrained(tmp / "model")
    if getattr(model, "ref_vae", None) is not None:
        model.ref_vae.save_pretrained(tmp / "ref_vae")
    for name, module in (extra or {}).items():  # e.g. the EMA prior
        module.save_pretrained(tmp / name)
    tensors, meta = optimizer_to_flat(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    return finish_checkpoint(run_dir, tmp, final, trainer_state=trainer_state, rng=rng, keep=keep)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run (renamed into place: complete when written), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
            and p.name[len(STEP_PREFIX):].isdigit()
            and ((p / "trainer.json").is_file() or (p / MANIFEST).is_file())]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def damage(ckpt: Path) -> str | None:
    """None if checkpoint `ckpt` is whole, else what is wrong, naming the file. With a
    manifest: every file it lists is present, of its size and sha256. Without one (written
    before manifests existed): trainer.json is there and every JSON and safetensors file
    parses."""
    ckpt = Path(ckpt)
    if (ckpt / MANIFEST).is_file():
        try:
            files = read_json(ckpt / MANIFEST)["files"]
            entries = [(rel, int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
        except (ModelFileError, KeyError, TypeError, ValueError, AttributeError) as e:
            return f"{ckpt / MANIFEST}: unreadable manifest ({e})"
        for rel, size, _ in entries:
            path = ckpt / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                return f"{ckpt / MANIFEST}: a file outside the checkpoint ({rel})"
            if not path.is_file():
                return f"{path}: missing"
            if path.stat().st_size != size:
                return f"{path}: {path.stat().st_size} bytes, {size} when written"
        for rel, _, sha in entries:  # sizes first: a truncated file is found without hashing
            if _sha256(ckpt / rel) != sha:
                return f"{ckpt / rel}: content differs from when it was written (sha256)"
        return None
    if not (ckpt / "trainer.json").is_file():
        return f"{ckpt / 'trainer.json'}: missing"
    for path in sorted(ckpt.rglob("*")):
        try:
            if path.suffix == ".json" and path.is_file():
                read_json(path)
            elif path.suffix == ".safetensors" and path.is_file():
                check_safetensors(path)
        except ModelFileError as e:
            return str(e)
    return None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest undamaged checkpoint of a run (None if it has none); each damaged newer one
    is logged with the file at fault. ValueError if every checkpoint is damaged (starting over
    would overwrite them: `--resume none` does that on purpose)."""
    ckpts = list_checkpoints(run_dir)
    first = None
    for ckpt in reversed(ckpts):
        why = damage(ckpt)
        if why is None:
            return ckpt
        first = first or why
        log.warning("checkpoint %s is damaged: %s; trying the one before it", ckpt.name, why)
    if ckpts:
        raise ValueError(f"every checkpoint in {Path(run_dir) / 'checkpoints'} is damaged "
                         f"(the newest: {first}); --resume none starts over")
    return None


def load_trainer_files(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
    """(trainer_state, rng tensors, optimizer tensors, optimizer meta) of a checkpoint."""
    state = json.loads((ckpt / "trainer.json").read_text())
    rng = load_file(str(ckpt / "trainer.safetensors"))
    opt_t = load_file(str(ckpt / "optimizer.safetensors"))
    opt_m = json.loads((ckpt / "optimizer.json").read_text())
    return state, rng, opt_t, opt_m
