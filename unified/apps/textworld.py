"""`cola make-shards textworld` and `cola eval textworld` (tasks/textworld/).

    cola make-shards textworld --output data/textworld --n-train 20000 --n-heldout 500
    cola eval textworld --checkpoint runs/s2/final -n 400      # Cola, AR or MDLM folder
"""

from __future__ import annotations

import argparse


def add_arguments(s: argparse.ArgumentParser) -> None:
    """Options of `cola eval textworld` (it also uses -n, --steps, --text-guidance and --noise-scale)."""
    g = s.add_argument_group("textworld")
    g.add_argument("--textworld-data", default="data/textworld/heldout",
                   help="held-out text-world shards (cola make-shards textworld); when absent "
                        "the same problems are generated from the evaluation stream")
    g.add_argument("--mdlm-steps", type=int, default=8,
                   help="masked-diffusion baseline: denoising passes per block")
    g.add_argument("--batch", type=int, default=32, help="prompts generated together")


def make_shards(args) -> None:
    from tasks.textworld.generator import make_textworld_shards

    counts = make_textworld_shards(args.output, n_train=args.n_train, n_heldout=args.n_heldout,
                                   seed=args.seed, max_per_shard=args.max_per_shard)
    print(f"wrote the text world to {args.output}: {counts}")


def run(args) -> dict:
    """Score a Cola or baseline checkpoint on held-out text-world problems; print per task."""
    from tasks.textworld.evaluate import (
        Decoding,
        copy_geometry,
        evaluate_textworld,
        problems_for_eval,
    )
    from unified.baselines import load_model
    from unified.data.streams import SkipCounter
    from unified.model import default_device

    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    model = load_model(args.checkpoint, default_device())
    skips = SkipCounter("text-world shards")
    problems, source = problems_for_eval(args.textworld_data, args.n, skips=skips)
    if skips.total:
        source += f" ({skips.total} bad records skipped: {dict(skips.counts)})"
    dec = Decoding(steps=args.steps, guidance=args.text_guidance, mdlm_steps=args.mdlm_steps,
                   batch=args.batch, noise_scale=args.noise_scale)
    kind = getattr(model, "kind", "cola")
    print(f"{len(problems)} problems from {source}; {kind} model {args.checkpoint}")
    report = evaluate_textworld(model, problems, dec)
    examples = report.pop("examples")
    if kind == "cola":  # where the prompt's values lie among the answer's latents
        report.update(copy_geometry(model, problems))
    for key, val in report.items():
        print(f"{key:>20}: {val:.4f}" if isinstance(val, float) else f"{key:>20}: {val}")
    for task, prompt, got, want in examples:
        print(f"  [{task}] ...{prompt[-40:]!r}\n      got {got!r}  want {want!r}")
    return report
