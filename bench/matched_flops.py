"""Training FLOPs per step of Cola (stage 1 and stage 2), the AR and the MDLM baselines, and the
baseline step counts that match a Cola recipe's total FLOPs (issue 14, matched comparisons).

    python -m bench.matched_flops --data data/textworld/train --tokenizer runs/tw-s1/final/tokenizer \
        --cola-steps 300 900

FLOPs are counted by torch.utils.flop_counter over one real optimizer step of each trainer on the
presets' own shapes (bench/training.py: forward and backward of every matmul and attention
product; Cola's stage 2 counts the Text VAE, the frozen reference encoder's forward and both
halves, clean and noisy, of the prior's 2L layout). Cola's budget is stage 1 (the Text VAE
alone) plus stage 2 (VAE and prior jointly); a baseline's matched step count is that total
divided by its FLOPs per step, rounded to the nearest step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from torch.utils.flop_counter import FlopCounterMode

from bench.training import make_trainer
from unified.config import load_preset
from unified.model import ColaModel, build_vae
from unified.training.trainer import Trainer
from vaes.tokenizer import load_tokenizer


def step_flops(tr: Trainer) -> int:
    """Counted FLOPs of one forward and backward pass of `tr` on its next batch."""
    micro = tr._next_micro(tr._batches())
    with FlopCounterMode(display=False) as fc:
        tr._step(micro)
    return fc.get_total_flops()


def stage1_trainer(preset: str, data: str, tokenizer: str, work: Path, sets: list[str]) -> Trainer:
    cfg = load_preset(preset, [f'data.train="{data}"', "data.shuffle_buffer=100",
                               'stage1.device="cpu"', *sets])
    init = work / "init"
    ColaModel(build_vae(cfg, load_tokenizer(tokenizer)), None,
              load_tokenizer(tokenizer)).save_pretrained(init)
    return Trainer(cfg, 1, work / "s1", init=init)


def count(preset: str, data: str, tokenizer: str, sets: list[str]) -> dict[str, int]:
    """FLOPs per step: cola_s1, cola_s2, ar, mdlm (baselines at the preset's matched size)."""
    out = {}
    with tempfile.TemporaryDirectory() as work:
        out["cola_s1"] = step_flops(stage1_trainer(preset, data, tokenizer, Path(work), sets))
    for kind in ("cola", "ar", "mdlm"):
        with tempfile.TemporaryDirectory() as work:
            tr = make_trainer(kind, preset, "fp32", data, Path(work), sets, tokenizer)
            out["cola_s2" if kind == "cola" else kind] = step_flops(tr)
    return out


def matched_steps(flops: dict[str, int], s1: int, s2: int) -> dict[str, int]:
    """Baseline steps whose FLOPs equal Cola's s1 stage-1 plus s2 stage-2 steps."""
    total = s1 * flops["cola_s1"] + s2 * flops["cola_s2"]
    return {k: max(1, round(total / flops[k])) for k in ("ar", "mdlm")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="text-default")
    ap.add_argument("--data", required=True, help="training shards (the step's real batches)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder shared by all three")
    ap.add_argument("--cola-steps", type=int, nargs=2, metavar=("STAGE1", "STAGE2"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    flops = count(args.preset, args.data, args.tokenizer, args.set)
    for k, v in flops.items():
        print(f"{k:>8}: {v / 1e9:8.1f} GFLOP/step")
    print(f"cola stage 2 / ar: {flops['cola_s2'] / flops['ar']:.2f}x, "
          f"stage 1 / ar: {flops['cola_s1'] / flops['ar']:.2f}x")
    if args.cola_steps:
        s1, s2 = args.cola_steps
        m = matched_steps(flops, s1, s2)
        total = s1 * flops["cola_s1"] + s2 * flops["cola_s2"]
        print(f"cola {s1} + {s2} steps = {total / 1e12:.2f} TFLOP -> ar {m['ar']} steps, "
              f"mdlm {m['mdlm']} steps")


if __name__ == "__main__":
    main()
