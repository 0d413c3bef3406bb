"""One trainer for both stages (DESIGN §3): stage 1 trains the Text VAE, stage 2 trains the VAE
and the prior jointly from a stage-1 VAE.

    trainer = Trainer(load_preset("text-default"), stage=1, out_dir="runs/s1")
    trainer.train()          # resumes from runs/s1/checkpoints if there is one

A unified preset (`data.pairs` set) also needs the task mixture that turns image-text records
into task samples; the trainer stays task-agnostic and takes it as an argument:

    Trainer(load_preset("shapes-default"), stage=1, out_dir="runs/s1", tasks=TaskMixture(cfg))

Every step then holds `data.batch_size` packed prose rows (text-to-text) and
`data.pair_batch_size` task samples (image-to-text, text-to-image, ...), both global.

Everything random in a step (masking, posterior noise, times, flow noise, condition dropout)
comes from one generator whose state is checkpointed with the model, optimizer, scheduler, step
and data position, so a resumed run continues the same loss sequence (tests/test_train.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from prior.dit import DiT
from unified.config import ColaConfig, TrainConfig
from unified.data.buckets import bucket_sizes
from unified.data.streams import (
    DataError,
    SkipCounter,
    expand_urls,
    text_batches,
    to_device,
)
from unified.losses import Terms, from_mean
from unified.losses import means as lmeans
from unified.model import ColaModel, build_image_vae, build_prior, build_vae, default_device
from unified.training import distributed as dist_utils
from unified.training import setup
from unified.training.batches import Slicing, StepStream
from unified.training.checkpoint import (
    begin_checkpoint,
    checkpoint_dirs,
    damage,
    finish_checkpoint,
    latest_checkpoint,
    latest_valid_checkpoint,
    load_trainer_files,
    optimizer_from_flat,
    save_checkpoint,
)
from unified.training.heldout import HeldOut
from unified.training.monitor import Monitor
from unified.training.samples import SampleLog
from vaes.text_vae import TextVAE
from vaes.weights import load_part

log = logging.getLogger("cola.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    return torch.device(name)


def data_units(batch: dict) -> int:
    """How much data a micro-batch holds, its weight in the global batch's loss: valid prose
    tokens (exact for text-only runs: a multi-rank step then equals one process) plus one per
    task sample (a proxy: task losses are per-task means)."""
    n = int((batch["text"]["sample_ids"] >= 0).sum()) if batch.get("text") else 0
    return n + len((batch.get("pairs") or {}).get("tasks", []))


def throughput_counts(batch: dict) -> tuple[int, int]:
    """(text tokens, images) a micro-batch feeds the model: prose and task-text tokens, and
    the images of its task samples (logged as tokens/s and images/s)."""
    tokens = sum(int((part["sample_ids"] >= 0).sum())
                 for part in (batch.get("text"), (batch.get("pairs") or {}).get("pieces")) if part)
    images = (batch.get("pairs") or {}).get("images")
    return tokens, int(images.shape[0]) if images is not None and images.dim() == 4 else 0


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: ColaConfig, stage: int, out_dir: str | Path, *,
                 init: str | Path | None = None, resume: bool | str | Path = "auto",
                 tasks=None):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage == 2 and init is None:
            raise ValueError("stage 2 starts from a stage-1 model: pass init=<folder>")
        self.cfg, self.stage, self.out = cfg, stage, Path(out_dir)
        self.tcfg: TrainConfig = cfg.stage1 if stage == 1 else cfg.stage2
        self.data = dataclasses.replace(cfg.data, **{  # this stage's batch sizes
            k: getattr(self.tcfg, k) for k in ("batch_size", "pair_batch_size")
            if getattr(self.tcfg, k) is not None})
        if cfg.data.pairs and tasks is None:
            raise ValueError("data.pairs is set: pass tasks= (e.g. tasks.TaskMixture(cfg)), "
                             "which turns image-text records into task samples")
        self.tasks = tasks if cfg.data.pairs else None
        if self.tasks is not None and self.data.pair_batch_size < 1:
            raise ValueError("data.pairs is set but data.pair_batch_size is 0")
        if self.tasks is None and self.data.batch_size < 1:
            raise ValueError("nothing to train on: set data.train with data.batch_size > 0 "
                             "(prose), or data.pairs (image-text shards)")
        self.device = resolve_device(self.tcfg.device)
        self.dist = dist_utils.init_distributed(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        per_step = self.dist.world * cfg.optim.grad_accum
        for key in ("batch_size", "pair_batch_size"):
            if getattr(self.data, key) % per_step:
                raise ValueError(f"data.{key} {getattr(self.data, key)} (global) must be a "
                                 f"multiple of world size x grad_accum = {per_step}")
        self.micro_rows = self.data.batch_size // per_step
        self.micro_pairs = self.data.pair_batch_size // per_step
        self.out.mkdir(parents=True, exist_ok=True)
        self.train_spec = cfg.data.train if self.data.batch_size else None
        if self.train_spec:
            expand_urls(self.train_spec)  # local shards must exist (URLs are webdataset's)
        limit = cfg.data.max_bad_samples
        self.skips = {k: SkipCounter(k, limit) for k in ("text", "pairs", "images")}

        if self.tcfg.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.tcfg.parallel!r}")
        self.fsdp = self.dist.enabled and self.tcfg.parallel == "fsdp"
        if self.fsdp and self.stage == 2 and self.cfg.loss.lambda_x0_ce > 0:
            raise ValueError("loss.lambda_x0_ce (a call of the Text VAE decoder with its weights "
                             "detached) is not supported with a sharded (fsdp) model: set it to "
                             "0 or parallel='ddp'")
        if self.fsdp and self.stage == 2 and self.tcfg.ema_decay > 0:
            raise ValueError("EMA of a sharded (fsdp) prior is not supported: set ema_decay=0 "
                             "or parallel='ddp'")
        ckpt = self._find_resume(resume)
        # model init draws from the global RNG: seeded here, the caller's RNG left as it was
        # (every draw of training comes from self.gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.tcfg.seed)
            self.model = self._build_model(init, ckpt).to(self.device)
        self.model.train()
        self.ema = None
        if self.stage == 2 and self.tcfg.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model.prior, decay=self.tcfg.ema_decay, use_warmup=True)
            if ckpt is not None:
                ema = load_part(DiT, ckpt / "ema_prior")
                self.ema.module.load_state_dict(ema.state_dict())
        if self.tcfg.compile:
            if self.stage != 2 or self.fsdp:
                raise ValueError("compile applies to the prior in stage 2 without fsdp")
            if self.device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
                log.warning("stage2.compile: inductor needs a C++ compiler on the CPU and "
                            "none is on PATH; training eagerly")
            else:
                self.model.prior.compile_blocks()
        self.train_model = self.model
        if self.fsdp:  # parameters, gradients and optimizer state sharded across ranks
            from unified.training.fsdp import shard_model

            shard_model(self.model, self.device.type, self.dist.world)
        elif self.dist.enabled:  # gradients all-reduced during backward
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, cfg.optim.warmup, self.tcfg.steps,
                                                    cfg.optim.min_lr_ratio))
        # per-rank stream of training randomness (masks, posterior noise, times, flow noise)
        self.gen = torch.Generator(device=self.device).manual_seed(
            self.tcfg.seed + 1 + 1000 * self.dist.rank)
        self.step, self.data_pos, self.bad_steps = 0, 0, 0
        self._names: list[str] | None = None  # the loss terms every rank reduces
        self.decoded = 0  # images decoded for training, all ranks
        self.heldout = HeldOut()
        self.samples = SampleLog()
        if ckpt is not None:
            self._restore(ckpt)
        if self.dist.is_main:
            (self.out / "config.json").write_text(cfg.to_json())

    # ----------------------------------------------------------------- construction
    def _find_resume(self, resume) -> Path | None:
        """'auto' (or True): the newest undamaged checkpoint of this run, if any (a damaged
        newer one is logged and skipped); 'none' (or False): start over; a path: that
        checkpoint, which must be undamaged."""
        if resume in (True, "auto"):
            return latest_valid_checkpoint(self.out)
        if resume in (False, "none", None):
            return None
        path = Path(resume)
        if not (path / "trainer.json").is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer.json)")
        why = damage(path)
        if why is not None:
            raise ValueError(f"checkpoint {path} is damaged: {why}")
        return path

    def _build_model(self, init, ckpt) -> ColaModel:
        if self.cfg.model.kind != "cola":
            return self._build_baseline(init, ckpt)
        if ckpt is not None:  # everything (incl. measured latent stats) comes from the checkpoint
            if (ckpt / "model-shard-0.safetensors").is_file():
                from unified.training.fsdp import load_sharded_model

                model = load_sharded_model(ckpt)
            else:
                model = ColaModel.from_pretrained(ckpt / "model")
            self._configure(model)
            if self.stage == 2:
                ref = load_part(TextVAE, ckpt / "ref_vae")
                model.ref_vae = ref.requires_grad_(False).eval()
            return model
        tok = setup.tokenizer(self, init)
        pretrained = self.cfg.image.pretrained
        if self.stage == 1:
            model = ColaModel(build_vae(self.cfg, tok), None, tok,
                              image_vae=build_image_vae(self.cfg) if self.tasks else None)
            if pretrained and self.tasks is not None:
                model.image_vae_source = Path(pretrained).resolve()
            return self._configure(model)
        base = ColaModel.from_pretrained(init)
        if pretrained and self.tasks is not None:  # honoured: this VAE, frozen, stats measured
            setup.use_pretrained_image_vae(base, pretrained)
        base = self._configure(base)
        if not base.vae.has_latent_stats or (
                base.image_vae is not None and base.image_vae.config.latents_mean is None):
            setup.measure_latent_stats(self, base)
        if base.prior is None:
            base.prior = build_prior(self.cfg, base.vae.config.latent_dim,
                                     base.image_token_dim if base.image_vae is not None else None)
        base.freeze_reference()
        return base

    def _build_baseline(self, init, ckpt):
        """A baseline of unified/baselines.py (`model.kind` "ar" or "mdlm"): one stage, prose
        only, the tokenizer of `init` (a Cola model folder) when given, else trained as in
        stage 1 on the same documents."""
        from unified.baselines import build_baseline, load_model

        if self.stage != 1 or self.tasks is not None or self.fsdp:
            raise ValueError(f"model.kind={self.cfg.model.kind!r} trains in one stage (--stage 1) "
                             "on prose only, replicated (parallel='ddp')")
        if ckpt is not None:
            return load_model(ckpt / "model")
        return build_baseline(self.cfg, setup.tokenizer(self, init))

    def _configure(self, model: ColaModel) -> ColaModel:
        """Training settings of this run on a built or loaded model: layout, image tokens and
        time; the image VAE trains in stage 1 unless it was loaded pretrained, never in stage 2."""
        im = self.cfg.image
        model.layout_cfg = self.cfg.layout
        model.image_patch_size, model.image_size = im.patch_size, im.size
        model.image_time = im.time
        if model.image_vae is not None and (self.stage == 2 or im.pretrained):
            model.image_vae.requires_grad_(False)
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if not isinstance(self.model, ColaModel):  # a baseline: every parameter, one group
            groups = [{"params": list(self.model.parameters()), "lr": o.lr}]
        else:
            groups = [{"params": [p for p in self.model.vae.parameters() if p.requires_grad],
                       "lr": o.lr * (o.vae_lr_mult if self.stage == 2 else 1.0)}]
            if self.stage == 1 and self.model.image_vae_trainable:
                groups.append({"params": list(self.model.image_vae.parameters()),
                               "lr": o.lr * self.cfg.image.lr_mult})
            if self.stage == 2:
                groups.append({"params": list(self.model.prior.parameters()), "lr": o.lr})
        if o.name == "adamw":  # fused: one kernel over all parameters (~3x faster on CPU)
            return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas),
                                     weight_decay=o.weight_decay, fused=not self.fsdp)
        from timm.optim import create_optimizer_v2, list_optimizers

        if o.name not in list_optimizers():
            raise ValueError(f"unknown optimizer {o.name!r}: 'adamw' or a timm optimizer name")
        # Muon orthogonalizes 2-D weight updates; timm falls back to AdamW for other params
        return create_optimizer_v2(groups, opt=o.name, lr=o.lr, weight_decay=o.weight_decay)

    def _restore(self, ckpt: Path) -> None:
        if (ckpt / "model-shard-0.safetensors").is_file():
            if not self.fsdp:
                raise ValueError(f"{ckpt} is sharded (FSDP); resume it with parallel='fsdp'")
            from unified.training.fsdp import load_shards

            load_shards(ckpt, self.dist.rank, self.model, self.optimizer)
            state = json.loads((ckpt / "trainer.json").read_text())
            if state.get("world") != self.dist.world:
                raise ValueError(f"{ckpt} was written by {state.get('world')} ranks; a sharded "
                                 f"checkpoint resumes with the same world size")
            rng = load_file(str(ckpt / "trainer.safetensors"))
        else:
            state, rng, opt_t, opt_m = load_trainer_files(ckpt)
            optimizer_from_flat(self.optimizer,
                                {k: v.to(self.device) for k, v in opt_t.items()}, opt_m)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.data_pos = state["step"], state["data_pos"]
        key = f"generator.{self.dist.rank}"
        if key in rng:
            self.gen.set_state(rng[key].cpu() if self.device.type == "cpu" else rng[key])
            torch.set_rng_state(rng[f"torch.{self.dist.rank}"])
        else:
            log.warning("checkpoint has no RNG state for rank %d (world size changed?): "
                        "randomness is reseeded, the loss sequence will differ", self.dist.rank)
        log.info("resumed from %s at step %d", ckpt, self.step)

    # ----------------------------------------------------------------- loop
    @property
    def skipped(self) -> int:
        """Samples skipped so far (this rank's count: the text and records are read alike
        on every rank; undecodable images are this rank's)."""
        return sum(c.total for c in self.skips.values())

    def _stream(self, tokenizer, seed: int, patch_size: int, slicing: Slicing,
                start: int = 0) -> StepStream:
        """The global stream of this run (the same on every rank) and how it is cut."""
        d = self.data

        def texts():
            return text_batches(self.train_spec, tokenizer, seq_len=d.seq_len,
                                batch_size=d.batch_size, seed=seed, resample=True,
                                skips=self.skips["text"], shuffle_buffer=d.shuffle_buffer,
                                multiple_of=patch_size, same_on_all_ranks=True)

        def pairs():
            return self.tasks.samples(tokenizer, seed, self.skips["pairs"])

        # stage 1 with a frozen (pretrained) image VAE trains on the captions alone
        images = self.stage == 2 or not isinstance(self.model, ColaModel) or \
            self.model.image_vae_trainable
        buckets = None  # aspect-ratio buckets (unified/data/buckets.py), when images are used
        model = getattr(self, "model", None)  # None while the model is built (latent stats)
        if d.buckets and images and getattr(model, "image_vae", None) is not None:
            buckets = bucket_sizes(d.buckets, self.cfg.image.size, model.image_factor)
        return StepStream(texts if d.batch_size else None, pairs if self.tasks else None,
                          slicing, seed=seed, start=start, seq_len=self.cfg.data.seq_len,
                          pad_id=tokenizer.pad_token_id, image_size=self.cfg.image.size,
                          flip=self.cfg.image.flip, skips=self.skips, decode=images,
                          buckets=buckets)

    def _batches(self):
        """Items of this rank's steps from the data position on (unified/training/batches.py:
        the global stream, fast-forwarded past what was consumed, cut into grad_accum x
        world slices; only this rank's images decoded, in `data.workers` processes)."""
        patch = self.model.vae.config.patch_size if isinstance(self.model, ColaModel) else 1
        slicing = Slicing(self.dist.rank, self.dist.world, self.cfg.optim.grad_accum,
                          self.data.batch_size, self.data.pair_batch_size)
        stream = self._stream(self.model.tokenizer, self.tcfg.seed, patch, slicing,
                              start=self.data_pos)
        items = stream
        if self.cfg.data.workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers
            items = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.cfg.data.workers,
                pin_memory=self.device.type == "cuda", prefetch_factor=2)
        for item in items:
            if item.get("error") is None:
                for name, (counts, fixed) in item["stats"].items():
                    if items is not stream:  # counted in a worker process
                        self.skips[name].merge(counts, fixed)
            yield item

    def _next_micro(self, batches) -> list[dict]:
        """This rank's micro-batches of the next step. Every rank learns whether some rank's
        data stream gave up (one small all-reduce, which also sums the images decoded), so
        all stop together with the message instead of waiting in a collective."""
        item = next(batches)
        error = item.get("error")
        head = torch.tensor([1.0 if error else 0.0, float(item.get("decoded", 0))],
                            dtype=torch.float64, device=self.device)
        head = dist_utils.sum_across_ranks(head, self.dist).tolist()
        if head[0] > 0:
            raise DataError(error or "another rank's data stream stopped the run (see its log)")
        self.decoded += int(head[1])
        return item["micro"]

    def _checkpoint(self) -> Path | None:
        mine = (self.gen.get_state().cpu(), torch.get_rng_state())
        states = [mine]
        if self.dist.enabled:
            states = [None] * self.dist.world
            torch.distributed.all_gather_object(states, mine)
        state = {"step": self.step, "data_pos": self.data_pos, "stage": self.stage,
                 "world": self.dist.world, "scheduler": self.scheduler.state_dict(),
                 "skipped_samples": self.skipped}
        rng = {}
        for r, (g, t) in enumerate(states):
            rng[f"generator.{r}"], rng[f"torch.{r}"] = g, t
        path = None
        if self.fsdp:  # every rank writes its shards into the temporary folder
            from unified.training.fsdp import save_shards, save_skeleton

            if self.dist.is_main:
                begin_checkpoint(self.out, self.step)
            dist_utils.barrier(self.dist)
            tmp, final = checkpoint_dirs(self.out, self.step)
            save_shards(tmp, self.dist.rank, self.model, self.optimizer)
            dist_utils.barrier(self.dist)
            if self.dist.is_main:
                save_skeleton(tmp, self.model)
                path = finish_checkpoint(self.out, tmp, final, trainer_state=state, rng=rng,
                                         keep=self.tcfg.keep)
        elif self.dist.is_main:
            path = save_checkpoint(self.out, self.step, model=self.model,
                                   optimizer=self.optimizer, trainer_state=state, rng=rng,
                                   keep=self.tcfg.keep,
                                   extra={"ema_prior": self.ema.module} if self.ema else None)
        dist_utils.barrier(self.dist)
        return path

    def inference_model(self) -> ColaModel:
        """What `final/` holds: the trained model, with the EMA prior when EMA is on (an
        unsharded copy, joined from the last checkpoint's shards, under FSDP)."""
        if self.fsdp:
            from unified.training.fsdp import load_sharded_model

            return load_sharded_model(latest_checkpoint(self.out))
        if self.ema is None:
            return self.model
        return self.model.with_prior(self.ema.module)

    def _terms(self, batch) -> Terms:
        """This micro-batch's loss terms as (sum, count) (unified/losses.py)."""
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16)
               if self.tcfg.precision == "bf16" else nullcontext())
        with amp:
            out = self.train_model(batch, self.stage, self.cfg.loss, self.gen)
        if isinstance(out, tuple):  # a baseline: (loss, logs), means over its data units
            loss, logs = out
            n = float(data_units(batch))
            out = {"loss": from_mean(loss, n),
                   **{k: from_mean(v.detach().float(), n) for k, v in logs.items()}}
        return out

    def _term_names(self, terms: Terms) -> list[str]:
        """The terms every rank reduces, in one order: all a forward of this run may return."""
        if not isinstance(self.model, ColaModel):  # a baseline: the same terms every step
            return sorted(terms)
        tasks = [k for k, v in self.cfg.tasks.ratios.items() if v > 0] if self.tasks else []
        return ColaModel.term_names(self.stage, tasks, prose=self.data.batch_size > 0,
                                    image_trainable=self.model.image_vae_trainable)

    def _combine(self, means: dict[str, torch.Tensor]):
        if isinstance(self.model, ColaModel):
            return ColaModel.combine(means, self.stage, self.cfg.loss)
        return means["loss"], {k: v.detach() for k, v in means.items() if k != "loss"}

    def _step(self, micro_batches) -> tuple[torch.Tensor, dict, tuple[int, int]] | None:
        """Forward/backward over this rank's micro-batches. The loss of the global batch is
        made of means over all of it: after each micro-batch's forward, the counts of its
        terms are summed over the ranks, and each rank back-propagates its sums over those
        global counts (times the world size, as DDP and FSDP average gradients), so the
        gradient is the one a single process computes on the whole slice set. Micro-batches
        of one rank (grad_accum > 1) are weighted by their share of the global batch's data
        units (exact for prose-only runs; a proxy for terms with random counts).
        Returns (loss, logged means, (text tokens, images) of the global batch), or None
        when the loss was not finite on any rank (a shared decision, so no rank waits on a
        collective the others skip)."""
        self.optimizer.zero_grad(set_to_none=True)
        dev, world = self.device, self.dist.world
        units = torch.tensor([float(data_units(mb)) for mb in micro_batches],
                             dtype=torch.float64, device=dev)
        units = dist_utils.sum_across_ranks(units, self.dist)
        share = (units / units.sum().clamp_min(1.0)).tolist()
        sums_all = counts_all = None
        for i, mb in enumerate(micro_batches):
            mb = to_device(mb, dev)
            if "rng" in mb:
                self.gen.manual_seed(mb["rng"]["slice"])
            last = i == len(micro_batches) - 1
            ddp = self.dist.enabled and not self.fsdp
            sync = self.train_model.no_sync() if ddp and not last else nullcontext()
            with sync:
                terms = self._terms(mb)
                if self._names is None:
                    self._names = self._term_names(terms)
                unknown = set(terms) - set(self._names)
                if unknown:
                    raise RuntimeError(f"loss terms {sorted(unknown)} are not among the terms "
                                       f"every rank reduces ({self._names})")
                zero = torch.zeros((), device=dev)
                sums = torch.stack([terms[k][0].float() if k in terms else zero
                                    for k in self._names])
                counts = torch.stack([terms[k][1].float() if k in terms else zero
                                      for k in self._names]).double()
                bad = (~torch.isfinite(sums.detach())).any().double()[None]
                head = dist_utils.sum_across_ranks(torch.cat([counts, bad]), self.dist)
                if head[-1].item() > 0:
                    self.optimizer.zero_grad(set_to_none=True)
                    return None
                counts = head[:-1]
                loss, _ = self._combine(lmeans(dict(zip(self._names, sums)),
                                               dict(zip(self._names, counts.tolist()))))
                (loss * (world * share[i])).backward()
            sums_all = sums.detach().double() + (0 if sums_all is None else sums_all)
            counts_all = counts + (0 if counts_all is None else counts_all)
        sums_all = dist_utils.sum_across_ranks(sums_all, self.dist)
        loss, logs = self._combine(lmeans(dict(zip(self._names, sums_all.cpu())),
                                          dict(zip(self._names, counts_all.tolist()))))
        seen = [throughput_counts(mb) for mb in micro_batches]  # this rank's share
        tokens, images = (sum(c) * world for c in zip(*seen))
        return loss.detach(), {k: float(v) for k, v in logs.items()}, (tokens, images)

    def _evaluate(self) -> dict[str, float]:
        """Held-out loss and terms ("heldout_*"; unified/training/heldout.py)."""
        return self.heldout.evaluate(self)

    def train(self, max_steps: int | None = None) -> list[dict]:
        """Run to `tcfg.steps` (or stop after `max_steps` more); returns a record per step
        (that step's losses over the global batch; every rank returns the same records; the
        logged steps also hold lr, grad norm, throughput and counts, and held-out losses).
        metrics.jsonl / TensorBoard get the losses averaged over each logging window
        (unified/training/monitor.py)."""
        t = self.tcfg
        stop_at = t.steps if max_steps is None else min(t.steps, self.step + max_steps)
        history: list[dict] = []
        main = self.dist.is_main
        bar = tqdm(total=t.steps, initial=self.step, desc=f"stage {self.stage}",
                   dynamic_ncols=True, mininterval=2.0, disable=not main)
        monitor = Monitor(self.out, self.stage, self.step, bar) if main else None
        batches = self._batches()
        tokens = images = 0
        t0 = time.perf_counter()
        try:
            while self.step < stop_at:
                micro = self._next_micro(batches)
                self.data_pos += 1
                done = self._step(micro)
                if done is None:
                    self.bad_steps += 1
                    log.warning("non-finite loss at step %d: step skipped (%d in a row)",
                                self.step, self.bad_steps)
                    if self.bad_steps >= t.max_bad_steps:
                        raise RuntimeError(
                            f"{self.bad_steps} non-finite losses in a row at step {self.step}; "
                            f"stopping. The last good checkpoint is {latest_checkpoint(self.out)}")
                    continue
                self.bad_steps = 0
                loss, terms, (n_tok, n_img) = done
                gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                       self.cfg.optim.grad_clip)
                gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.model.prior, step=self.step)
                tokens, images = tokens + n_tok, images + n_img
                rec = {"step": self.step, "loss": float(loss), **terms}
                history.append(rec)
                if monitor is not None:
                    monitor.add({k: v for k, v in rec.items() if k != "step"}
                                | {"grad_norm": float(gnorm)})
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == stop_at:
                    dt = time.perf_counter() - t0
                    extra = dict(lr=self.scheduler.get_last_lr()[-1],
                                 tokens_per_s=tokens / dt, skipped=self.skipped)
                    if images:
                        extra["images_per_s"] = images / dt
                    if self.tasks is not None:  # by all ranks, each its own slices' images
                        fixed = self.skips["pairs"].fixed
                        extra.update(images_decoded=self.decoded,
                                     captions_truncated=fixed["caption truncated"],
                                     metadata_ignored=fixed["unreadable .json metadata ignored"])
                    rec.update(extra, grad_norm=float(gnorm))
                    if monitor is not None:
                        monitor.log(self.step, extra)
                    tokens = images = 0
                    t0 = time.perf_counter()
                if t.eval_every and self.step % t.eval_every == 0:
                    held = self._evaluate()
                    rec.update(held)
                    if monitor is not None and held:
                        monitor.write({"step": self.step, **held}, f"stage{self.stage}")
                        log.info("step=%d %s", self.step,
                                 " ".join(f"{k}={v:.4g}" for k, v in held.items()))
                if self.step % t.ckpt_every == 0:
                    self._checkpoint()
                if monitor is not None:  # sample captions and images (unified/training/samples.py)
                    self.samples.log(self, monitor.writer, self.step)
        finally:
            bar.close()
            if monitor is not None:
                monitor.close()
        if self.step >= t.steps:
            self._checkpoint()
            if main:
                self.inference_model().save_pretrained(self.out / "final")
                log.info("finished: model written to %s", self.out / "final")
            dist_utils.barrier(self.dist)
        return history
