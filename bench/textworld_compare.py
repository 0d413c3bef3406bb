"""Cola, the AR and the MDLM baselines on the text world at matched parameters and training
FLOPs, at several budgets (issue 14, "Matched comparisons"). Prints and writes a table of exact
match per task.

    cola make-shards textworld --output data/textworld --n-train 20000 --n-heldout 500
    python -m bench.textworld_compare --data data/textworld --out runs/twc \
        --budget 100 150 --budget 400 600 -n 200

A budget is Cola's recipe, stage-1 steps then stage-2 steps (text-default: Text VAE 2+2 x 256,
DiT 6 x 256, 10.7M parameters); the AR and the MDLM (ar-default / mdlm-default, 10.8M) get the
steps whose counted FLOPs equal Cola's total (bench/matched_flops.py: stage 1 plus stage 2,
the 2L layout and the VAE included). All runs share one tokenizer: the first budget's stage 1
trains it, and every other run takes it through --init. Finished runs are not trained again
(their `final/` folder exists), so an interrupted comparison is resumed by running it again.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from tasks.textworld.generator import TASKS

LINE = re.compile(r"^\s*(exact_\w+|partial_\w+|n_\w+): (\S+)$")


def cola(*args: str) -> list[str]:
    return [sys.executable, "-m", "unified.apps.cli", *args]


def train(out: Path, preset: str, stage: int, steps: int, init: Path | None, data: Path,
          warmup: int, extra: list[str]) -> Path:
    final = out / "final"
    if final.exists():
        print(f"{final} exists: not trained again", flush=True)
        return final
    cmd = cola("train", "--preset", preset, "--stage", str(stage), "--out", str(out),
               "--resume", "auto",
               "--set", f'data.train="{data / "train"}"', "--set",
               f'data.heldout="{data / "heldout"}"', "--set", f"optim.warmup={warmup}",
               "--set", f"stage{stage}.steps={steps}", "--set", f"stage{stage}.log_every=50",
               "--set", f"stage{stage}.ckpt_every={max(50, steps // 4)}", *extra)
    if init is not None:
        cmd += ["--init", str(init)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return final


def evaluate(ckpt: Path, data: Path, n: int, steps: int, guidance: float) -> dict[str, float]:
    # one log per decoding setting: a cached result is only reused for the same n, steps, CFG
    log = ckpt.parent / f"textworld-eval-n{n}-s{steps}-g{guidance:g}.txt"
    if not log.exists():
        cmd = cola("eval", "textworld", "--checkpoint", str(ckpt), "-n", str(n),
                   "--textworld-data", str(data / "heldout"), "--steps", str(steps),
                   "--text-guidance", str(guidance))
        print("$", " ".join(cmd), flush=True)
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        log.write_text(res.stdout)
    out = {}
    for line in log.read_text().splitlines():
        m = LINE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    print(log.read_text(), flush=True)
    return out


def comparison_parser(doc: str, data_help: str) -> argparse.ArgumentParser:
    """The arguments every matched-FLOP comparison takes (this one, bench/prose_compare.py)."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help=data_help)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=int, nargs=2, action="append", required=True,
                    metavar=("STAGE1", "STAGE2"), help="Cola's steps per stage; repeatable")
    ap.add_argument("--warmup", type=int, default=30, help="optimizer warmup steps (every run)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to every run")
    return ap


def main() -> None:
    ap = comparison_parser(__doc__, "cola make-shards textworld output")
    ap.add_argument("-n", type=int, default=200, help="held-out problems per model")
    ap.add_argument("--steps", type=int, default=8, help="Cola: ODE steps per block")
    ap.add_argument("--text-guidance", type=float, default=1.0, help="Cola: CFG scale")
    args = ap.parse_args()
    from bench.matched_flops import count, matched_steps

    extra = [x for kv in args.set for x in ("--set", kv)]
    budgets = sorted(args.budget, key=lambda b: b[0] + b[1])
    tok_run = train(args.out / f"cola-s1-{budgets[0][0]}", "text-default", 1, budgets[0][0],
                    None, args.data, args.warmup, extra)
    flops = count("text-default", str(args.data / "train"), str(tok_run / "tokenizer"), args.set)
    print({k: f"{v / 1e9:.1f} GFLOP/step" for k, v in flops.items()}, flush=True)
    rows = []
    for s1, s2 in budgets:
        total = s1 * flops["cola_s1"] + s2 * flops["cola_s2"]
        base = matched_steps(flops, s1, s2)
        vae = train(args.out / f"cola-s1-{s1}", "text-default", 1, s1, tok_run, args.data,
                    args.warmup, extra) if s1 != budgets[0][0] else tok_run
        runs = {
            f"Cola ({s1} + {s2} steps)": train(args.out / f"cola-s2-{s1}-{s2}", "text-default",
                                               2, s2, vae, args.data, args.warmup, extra),
            f"AR ({base['ar']} steps)": train(args.out / f"ar-{base['ar']}", "ar-default", 1,
                                              base["ar"], tok_run, args.data, args.warmup, extra),
            f"MDLM ({base['mdlm']} steps)": train(args.out / f"mdlm-{base['mdlm']}",
                                                  "mdlm-default", 1, base["mdlm"], tok_run,
                                                  args.data, args.warmup, extra),
        }
        for name, ckpt in runs.items():
            rows.append((total, name, evaluate(ckpt, args.data, args.n, args.steps,
                                               args.text_guidance)))
    head = "| budget (TFLOP) | model | " + " | ".join(TASKS) + " | all |"
    lines = ["exact match % (partial credit %: tasks/textworld/scorer.py `partial`)", "",
             head, "|" + "---|" * (len(TASKS) + 3)]
    for total, name, r in rows:
        cells = [f"{100 * r.get(f'exact_{t}', float('nan')):.1f} "
                 f"({100 * r.get(f'partial_{t}', float('nan')):.0f})" for t in (*TASKS, "all")]
        lines.append(f"| {total / 1e12:.0f} | {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
