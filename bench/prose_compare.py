"""Cola, the AR and the MDLM baselines on prose at matched parameters and training FLOPs, at
several budgets, judged by an independent AR with several times the largest budget (issue 14,
"Matched comparisons", prose). Trains what is missing, then runs bench/genppl.py on all of it.

    python -m bench.prose_compare --data data/stdlib --out runs/prose \\
        --budget 50 75 --budget 200 300 -n 214 --prompt-tokens 12 --new-tokens 32

A budget is Cola's recipe, stage-1 steps then stage-2 steps (text-default: Text VAE 2+2 x 256,
DiT 6 x 256, 10.7M parameters); the AR and the MDLM (ar-default / mdlm-default, 10.8M) get the
steps whose counted FLOPs equal Cola's total (bench/matched_flops.py: stage 1 plus stage 2, the
2L layout and the VAE included). The judge is the AR baseline's architecture trained for
--judge-mult times the AR steps of the largest budget, on the same training split; it is no
contestant. All runs share one tokenizer (the first budget's stage 1 trains it). Finished runs
are not trained again (their `final/` folder exists), so an interrupted comparison resumes by
running it again.
"""

from __future__ import annotations

import subprocess
import sys

from bench.textworld_compare import comparison_parser, train


def main() -> None:
    ap = comparison_parser(__doc__, "a folder with train/ and heldout/")
    ap.add_argument("--judge-mult", type=float, default=4.0,
                    help="the judge's steps: this many times the largest budget's AR steps")
    ap.add_argument("--train-only", action="store_true", help="train, do not judge")
    args, genppl_args = ap.parse_known_args()  # the rest goes to bench.genppl
    from bench.matched_flops import count, matched_steps

    extra = [x for kv in args.set for x in ("--set", kv)]
    budgets = sorted(args.budget, key=lambda b: b[0] + b[1])
    tok_run = train(args.out / f"cola-s1-{budgets[0][0]}", "text-default", 1, budgets[0][0],
                    None, args.data, args.warmup, extra)
    flops = count("text-default", str(args.data / "train"), str(tok_run / "tokenizer"), args.set)
    print({k: f"{v / 1e9:.1f} GFLOP/step" for k, v in flops.items()}, flush=True)
    models: list[str] = []
    for s1, s2 in budgets:
        tflop = (s1 * flops["cola_s1"] + s2 * flops["cola_s2"]) / 1e12
        base = matched_steps(flops, s1, s2)
        vae = train(args.out / f"cola-s1-{s1}", "text-default", 1, s1, tok_run, args.data,
                    args.warmup, extra) if s1 != budgets[0][0] else tok_run
        runs = {
            f"AR, {tflop:.0f} TFLOP ({base['ar']} steps)":
                train(args.out / f"ar-{base['ar']}", "ar-default", 1, base["ar"], tok_run,
                      args.data, args.warmup, extra),
            f"MDLM, {tflop:.0f} TFLOP ({base['mdlm']} steps)":
                train(args.out / f"mdlm-{base['mdlm']}", "mdlm-default", 1, base["mdlm"],
                      tok_run, args.data, args.warmup, extra),
            f"Cola, {tflop:.0f} TFLOP ({s1} + {s2} steps)":
                train(args.out / f"cola-s2-{s1}-{s2}", "text-default", 2, s2, vae, args.data,
                      args.warmup, extra),
        }
        for name, ckpt in runs.items():
            models += ["--model", name, str(ckpt)]
    s1, s2 = budgets[-1]
    judge_steps = round(args.judge_mult * matched_steps(flops, s1, s2)["ar"])
    judge = train(args.out / f"judge-ar-{judge_steps}", "ar-default", 1, judge_steps, tok_run,
                  args.data, args.warmup, extra)
    judge_tflop = judge_steps * flops["ar"] / 1e12
    if args.train_only:
        return
    cmd = [sys.executable, "-m", "bench.genppl", "--judge", str(judge),
           "--judge-name", f"AR, {judge_tflop:.0f} TFLOP ({judge_steps} steps)",
           "--data", str(args.data / "heldout"), "--table", str(args.out / "table.md"),
           *models, *genppl_args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
