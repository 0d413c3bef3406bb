"""Training checkpoints as safetensors + JSON (never pickle), written atomically.

A checkpoint folder `step-00001234/` holds:
  model/            the model folder (ColaModel.save_pretrained; a frozen pretrained image VAE
                    as its config + a reference to the weights in its folder, not a copy)
  ref_vae/          the frozen reference encoder (stage 2)
  ema_prior/        the EMA of the prior (stage 2, when enabled)
  optimizer.safetensors + optimizer.json   tensors and the rest of the optimizer state
  trainer.safetensors + trainer.json       RNG states; step, data position, scheduler, config
It is written as `.step-00001234.tmp/` and renamed when complete, so a kill mid-write never
leaves a broken checkpoint under a final name; `latest_checkpoint` ignores temporary folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step-"


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


def finish_checkpoint(run_dir: Path, tmp: Path, final: Path, *, trainer_state: dict,
                      rng: dict[str, torch.Tensor], keep: int) -> Path:
    """Write the trainer state last, rename the folder into place, prune to `keep`."""
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "trainer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # atomic on one filesystem
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
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir()
            if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "trainer.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_files(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
    """(trainer_state, rng tensors, optimizer tensors, optimizer meta) of a checkpoint."""
    state = json.loads((ckpt / "trainer.json").read_text())
    rng = load_file(str(ckpt / "trainer.safetensors"))
    opt_t = load_file(str(ckpt / "optimizer.safetensors"))
    opt_m = json.loads((ckpt / "optimizer.json").read_text())
    return state, rng, opt_t, opt_m
