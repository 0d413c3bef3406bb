"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for presets too large to replicate per GPU.

Sharding: every transformer block of the Text VAE and the prior is its own FSDP unit, then the
VAE and the prior as a whole; the frozen reference encoder stays replicated (it has no
gradients or optimizer state). Parameters are sharded along dim 0 across the ranks.

Checkpoints stay safetensors + JSON: every rank writes the local shards of its parameters
(`model-shard-R.safetensors`) and of its optimizer state (`optimizer-shard-R.*`), and rank 0
writes the model's configs and tokenizer (`model/`, no weights). `load_sharded_model` joins
the shards in rank order into an ordinary, unsharded ColaModel for inference. Resuming a
sharded checkpoint needs the same world size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from unified.model import ColaModel
from unified.training.checkpoint import optimizer_from_flat, optimizer_to_flat

SHARDED_PREFIXES = ("vae.", "prior.", "image_vae.")


def shard_model(model: ColaModel, device_type: str, world: int) -> None:
    """Apply fully_shard to the blocks, then to the VAE and the prior (in place)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world,))
    for blk in [*model.vae.encoder, *model.vae.decoder]:
        fully_shard(blk, mesh=mesh)
    fully_shard(model.vae, mesh=mesh)
    for method in ("encode", "decode"):  # the VAE is called through these, not forward()
        register_fsdp_forward_method(model.vae, method)
    if model.image_vae is not None and not model.image_vae_linkable:
        # trained in stage 1, frozen (but still sharded) after; a frozen pretrained VAE stays
        # replicated and out of the shards (checkpoints refer to its folder)
        fully_shard(model.image_vae, mesh=mesh)
        for method in ("encode", "decode"):
            register_fsdp_forward_method(model.image_vae, method)
    if model.prior is not None:
        for blk in model.prior.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(model.prior, mesh=mesh)


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def save_shards(folder: Path, rank: int, model: ColaModel, optimizer) -> None:
    """Every rank: its local parameter shards and optimizer state."""
    sd = model.state_dict()
    shards = {k: _local(v).detach().contiguous().cpu() for k, v in sd.items()
              if k.startswith(SHARDED_PREFIXES)
              and not (k.startswith("image_vae.") and model.image_vae_linkable)}
    save_file(shards, str(folder / f"model-shard-{rank}.safetensors"))
    tensors, meta = optimizer_to_flat(optimizer, local=_local)
    save_file(tensors, str(folder / f"optimizer-shard-{rank}.safetensors"))
    (folder / f"optimizer-shard-{rank}.json").write_text(json.dumps(meta))


def save_skeleton(folder: Path, model: ColaModel) -> None:
    """Rank 0: configs, tokenizer and index of the model (no weights) + the reference VAE."""
    model.save_pretrained(folder / "model", weights=False, link_image_vae=True)
    if model.ref_vae is not None:
        model.ref_vae.save_pretrained(folder / "ref_vae")


def load_shards(folder: Path, rank: int, model: ColaModel, optimizer) -> None:
    """Every rank: copy its saved shards into the (already sharded) model and optimizer."""
    shards = load_file(str(folder / f"model-shard-{rank}.safetensors"))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in shards:
                _local(v).copy_(shards[k])
    tensors = load_file(str(folder / f"optimizer-shard-{rank}.safetensors"))
    meta = json.loads((folder / f"optimizer-shard-{rank}.json").read_text())
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def like(pid: int, t: torch.Tensor):
        p = params[pid]
        if isinstance(p, DTensor) and t.dim() > 0:
            return DTensor.from_local(t.to(p.device), p.device_mesh, p.placements,
                                      shape=p.shape, stride=p.stride())
        return t.to(p.device)

    optimizer_from_flat(optimizer, tensors, meta, convert=like)


def load_sharded_model(folder: str | Path) -> ColaModel:
    """An unsharded ColaModel from a sharded checkpoint (any process, no process group)."""
    folder = Path(folder)
    files = sorted(folder.glob("model-shard-*.safetensors"),
                   key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not files:
        raise FileNotFoundError(f"no model-shard-*.safetensors in {folder}")
    model = ColaModel.from_pretrained(folder / "model", weights=False)
    parts = [load_file(str(f)) for f in files]
    full = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
    missing = [k for k in model.state_dict() if k.startswith(SHARDED_PREFIXES) and k not in full
               and not (k.startswith("image_vae.") and model.image_vae_source is not None)]
    if missing:
        raise ValueError(f"sharded checkpoint {folder} lacks {missing[:3]}...")
    model.load_state_dict(full, strict=False)
    return model.float().eval()
