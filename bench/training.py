"""Training throughput and model FLOPs utilization (MFU) of one training step.

    python -m bench.training                                   # text-default, bf16 and fp32
    python -m bench.training --preset text-base --kinds cola --precision bf16
    python -m bench.training --profile                         # torch.profiler of each step

Run it as a module from the checkout (`python -m bench...`). Needs the default corpus's shards
(`python -m unified.apps.cli make-shards text --default-corpus --output data/stdlib`).

MFU = model FLOPs per step / step time / peak matmul FLOP/s, where
- model FLOPs per step are counted by torch.utils.flop_counter over one real step: forward and
  backward of every matmul and attention product it executes (for Cola stage 2: the Text VAE's
  passes, the frozen reference encoder's forward, and both halves, clean and noisy, of the
  prior's 2L layout; attention counted dense, as the kernels compute it);
- the peak is the best square-matmul rate measured in this run in the same precision.
"trainer" times whole steps of unified.training.trainer.Trainer.train (data loading included);
"compute" repeats forward, backward, clipping and the optimizer step on one prefetched batch.
Cola is timed in stage 2 (VAE and prior jointly, from a random stage-1 VAE); the AR and MDLM
baselines are unified/baselines.py at Cola's parameter count (width of the prior, SwiGLU 8/3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars between the table's rows

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from unified.apps.cli import DEFAULT_CHECKPOINT
from unified.baselines import matched_depth
from unified.config import load_preset
from unified.model import ColaModel, build_vae
from unified.training.trainer import Trainer
from vaes.tokenizer import load_tokenizer

aten = torch.ops.aten
if aten._scaled_dot_product_flash_attention_for_cpu not in torch.utils.flop_counter.flop_registry:
    # the CPU flash-attention kernels have no formula in torch's counter: count them as dense
    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _sdpa_cpu_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)


def peak_matmul(dtype: torch.dtype, sizes=(1024, 2048, 4096), seconds: float = 1.5) -> float:
    """Best FLOP/s of one square matmul n x n x n in `dtype` (this machine, this run). The
    fastest single call, not an average: on a shared machine the average sinks whenever a
    neighbour runs, and a low peak would flatter MFU."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        c = torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < seconds / len(sizes):
            t = time.perf_counter()
            torch.mm(a, b, out=c)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
            reps += 1
    return best


def make_trainer(kind: str, preset: str, precision: str, data: str, work: Path,
                 overrides: list[str], tokenizer: str) -> Trainer:
    """A Trainer of `kind` on the preset with a given tokenizer (no BPE training): the
    vocabulary is the tokenizer's, whatever the preset's vocab_size says."""
    big = 10**9
    sets = [f'data.train="{data}"', "data.shuffle_buffer=100", *overrides]
    for st in ("stage1", "stage2"):
        sets += [f"{st}.steps={big}", f"{st}.log_every={big}", f"{st}.ckpt_every={big}",
                 f'{st}.precision="{precision}"', f'{st}.device="cpu"', f"{st}.ema_decay=0.0"]
    cfg = load_preset(preset, sets)
    tok = load_tokenizer(tokenizer)
    init = work / "init"
    ColaModel(build_vae(cfg, tok), None, tok).save_pretrained(init)  # a (random) stage-1 VAE
    if kind == "cola":
        return Trainer(cfg, 2, work / kind, init=init)
    n_cola = cola_params(cfg, tok)
    width = cfg.prior.width
    inter = round(8 / 3 * width / 16) * 16
    depth = matched_depth(n_cola, len(tok), width, inter)
    cfg = load_preset(preset, [*sets, f'model.kind="{kind}"', f"model.width={width}",
                               f"model.depth={depth}", f"model.heads={cfg.prior.heads}",
                               f"model.intermediate={inter}"])
    return Trainer(cfg, 1, work / kind, init=init)


def cola_params(cfg, tok) -> int:
    from unified.model import build_prior

    with torch.device("meta"):
        vae, prior = build_vae(cfg, tok), build_prior(cfg, cfg.vae.latent_dim)
    return sum(p.numel() for m in (vae, prior) for p in m.parameters())


def compute_step(tr: Trainer, micro) -> None:
    tr._step(micro)
    torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.cfg.optim.grad_clip)
    tr.optimizer.step()


def measure(tr: Trainer, steps: int, profile: bool) -> dict:
    trainable = [p for p in tr.model.parameters() if p.requires_grad]
    micro = tr._next_micro(tr._batches())
    tokens = sum(int((mb["text"]["sample_ids"] >= 0).sum()) for mb in micro)
    blocks = tr.model.prior.blocks if getattr(tr.model, "prior", None) is not None else []
    compiled = [blk.compiled for blk in blocks]
    for blk in blocks:  # counted eagerly: compiled kernels hide ops from the counter
        blk.compiled = None
    with FlopCounterMode(display=False) as fc:
        tr._step(micro)
    for blk, regions in zip(blocks, compiled):
        blk.compiled = regions
    flops = fc.get_total_flops()
    # whole trainer steps (data loading included): the median interval between optimizer
    # steps over the second half of 2 x `steps` (the first half warms up)
    stamps, step = [], tr.optimizer.step

    def stamped(*a, **k):
        out = step(*a, **k)
        stamps.append(time.perf_counter())
        return out

    tr.optimizer.step = stamped
    tr.train(max_steps=2 * steps)
    tr.optimizer.step = step
    trainer_s = statistics.median(b - a for a, b in zip(stamps[steps - 1:], stamps[steps:]))
    compute_step(tr, micro)
    t0 = time.perf_counter()
    for _ in range(steps):
        compute_step(tr, micro)
    compute_s = (time.perf_counter() - t0) / steps
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            compute_step(tr, micro)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return {"params": sum(p.numel() for p in trainable), "tokens": tokens, "flops": flops,
            "trainer_s": trainer_s, "compute_s": compute_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="text-default")
    ap.add_argument("--kinds", nargs="+", default=["cola", "ar", "mdlm"],
                    choices=["cola", "ar", "mdlm"])
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after as many warm-up)")
    ap.add_argument("--data", default="data/stdlib/train")
    ap.add_argument("--tokenizer", default=str(DEFAULT_CHECKPOINT / "tokenizer"),
                    help="tokenizer folder (default: the bundled model's, 4096 tokens)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--compile", action="store_true",
                    help="Cola: torch.compile the prior's blocks (stage2.compile=true)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    from unified.training.malloc import keep_freed_memory

    keep_freed_memory()  # as `cola train` does on a CPU (freed activations reused, not re-faulted)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    peaks = {p: peak_matmul(dtypes[p]) for p in args.precision}
    cfg = load_preset(args.preset, args.set)
    print(f"preset {args.preset}: prior {cfg.prior.depth} x {cfg.prior.width}, Text VAE "
          f"{cfg.vae.enc_layers}+{cfg.vae.dec_layers} x {cfg.vae.width}; batch "
          f"{cfg.data.batch_size} x {cfg.data.seq_len} tokens; {torch.get_num_threads()} threads"
          f"{'; Cola compiled' if args.compile else ''}")
    rows = []
    for prec in args.precision:
        for kind in args.kinds:
            with tempfile.TemporaryDirectory() as work:
                sets = args.set + (["stage2.compile=true"] if args.compile else [])
                tr = make_trainer(kind, args.preset, prec, args.data, Path(work), sets,
                                  args.tokenizer)
                r = measure(tr, args.steps, args.profile)
            print(f"measured {kind} {prec}: {r['compute_s']:.3f} s a step", flush=True)
            rows.append((kind, prec, r))
    # A shared machine's speed drifts: the peak is measured again after the runs, and MFU
    # divides by the higher of the two (the conservative figure).
    for p in args.precision:
        peaks[p] = max(peaks[p], peak_matmul(dtypes[p]))
    print("peak matmul (best of before and after the runs): " +
          ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    print(f"{'model':<8}{'prec':>6}{'params':>9}{'GFLOP/step':>12}{'trainer s':>11}"
          f"{'compute s':>11}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'MFU trainer':>13}")
    for kind, prec, r in rows:
        rate = r["flops"] / r["compute_s"]
        name = "cola s2" if kind == "cola" else kind
        print(f"{name:<8}{prec:>6}{r['params'] / 1e6:>8.1f}M{r['flops'] / 1e9:>12.1f}"
              f"{r['trainer_s']:>11.3f}{r['compute_s']:>11.3f}"
              f"{r['tokens'] / r['compute_s']:>10.0f}{rate / 1e9:>9.0f}"
              f"{rate / peaks[prec]:>7.1%}"
              f"{r['flops'] / r['trainer_s'] / peaks[prec]:>13.1%}")
    print("(MFU = counted model FLOPs per step / compute step time / this run's matmul peak of "
          "the same precision; 'MFU trainer' uses whole trainer steps, data loading included)")


if __name__ == "__main__":
    main()
