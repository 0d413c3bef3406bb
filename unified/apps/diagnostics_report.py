"""`cola eval diagnostics`: run the diagnostics of unified/apps/diagnostics.py on a checkpoint
and print them as markdown tables (optionally also written to a file, e.g. for docs/).

    cola eval diagnostics --checkpoint demo/checkpoint --max-docs 100 --markdown diag.md
    cola eval diagnostics --checkpoint runs/ar/final --parts prompts      # a baseline
"""

from __future__ import annotations

import argparse
import shlex
import time

import torch

from unified.apps import diagnostics as D

PARTS = ("history", "prompts", "geometry", "decoder", "sweep")


def _numbers(kind):
    def parse(text: str):
        try:
            out = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not out:
            raise argparse.ArgumentTypeError("expected at least one number")
        return out
    return parse


def _parts(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in PARTS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown part(s) {bad}; choose from {','.join(PARTS)}")
    return out


def add_arguments(s: argparse.ArgumentParser) -> None:
    """Options of `cola eval diagnostics` (it also uses --data, --max-docs, --steps and
    --text-guidance of `cola eval`)."""
    g = s.add_argument_group("diagnostics")
    g.add_argument("--parts", type=_parts, default=list(PARTS),
                   help=f"which diagnostics, comma-separated (default: {','.join(PARTS)})")
    g.add_argument("--prompts", metavar="FILE", help="prompt set, one per line (default: 8 "
                   "short prompts of the default corpus's kind)")
    g.add_argument("--seeds", type=int, default=4, help="seeds per prompt (>= 2)")
    g.add_argument("--new-tokens", type=int, default=32, help="tokens per continuation")
    g.add_argument("--guidance-sweep", type=_numbers(float), default=[1.0, 2.0, 5.0],
                   metavar="G1,G2,..", help="CFG scales of the sweep (at --steps)")
    g.add_argument("--steps-sweep", type=_numbers(int), default=[4, 8, 16], metavar="S1,S2,..",
                   help="ODE steps of the sweep (at --text-guidance)")
    g.add_argument("--noise-scale-sweep", type=_numbers(float), default=[1.0, 0.5, 0.25],
                   metavar="S1,S2,..", help="Cola: starting-noise stds of the sweep (the "
                   "flow's temperature; at --steps and --text-guidance)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="baselines only: token sampling temperature (Cola's flow samples)")
    g.add_argument("--posterior", choices=["mean", "sample"], default="mean",
                   help="history gain: latents are posterior means or samples")
    g.add_argument("--max-latents", type=int, default=4096, help="latent geometry: latents compared")
    g.add_argument("--markdown", metavar="FILE", help="also write the tables to this file")


# ----------------------------------------------------------------------------- tables


def _f(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if x == x and abs(x) != float("inf") else str(x)


def _ratio(x: float) -> str:
    return f"{x:.1f}x" if x == x and x != float("inf") else str(x)


def _gain(visible: float, other: float) -> str:
    return f"{100 * (1 - visible / other):+.1f}%" if other else "n/a"


def history_table(r: dict) -> str:
    lines = ["| t | loss tokens | visible | hidden | dropped | gain vs hidden | gain vs dropped |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [(f"[{lo:g}, {hi:g})", i) for i, (lo, hi) in enumerate(r["buckets"])]
    for name, i in rows:
        vis, hid, drp = (r["loss"][v][i] for v in D.VARIANTS)
        lines.append(f"| {name} | {r['tokens'][i]} | {_f(vis)} | {_f(hid)} | {_f(drp)} | "
                     f"{_gain(vis, hid)} | {_gain(vis, drp)} |")
    vis, hid, drp = (sum(r["loss"][v]) / len(r["loss"][v]) for v in D.VARIANTS)
    lines.append(f"| mean of buckets | {sum(r['tokens'])} | {_f(vis)} | {_f(hid)} | {_f(drp)} | "
                 f"{_gain(vis, hid)} | {_gain(vis, drp)} |")
    return "\n".join(lines)


def sensitivity_row(label: str, r: dict) -> str:
    return (f"| {label} | {_f(r['across_prompts'])} | {_f(r['across_seeds'])} | "
            f"{_ratio(r['ratio'])} | {r['words']:.1f} | {r['distinct2']:.2f} |")


SENS_HEAD = ["| setting | across prompts (one seed) | across seeds (one prompt) | ratio | words | "
             "distinct-2 |", "|---|---:|---:|---:|---:|---:|"]


def samples_block(r: dict, prompts: list[str], seeds: list[int]) -> str:
    s = r["samples"]
    lines = ["same seed, different prompts:"]
    lines += [f"  [{p}] -> {s[f'{p} | seed {seeds[0]}']!r}" for p in prompts]
    lines += ["same prompt, different seeds:"]
    lines += [f"  [{prompts[0]}] seed {k} -> {s[f'{prompts[0]} | seed {k}']!r}" for k in seeds]
    return "```\n" + "\n".join(lines) + "\n```"


def geometry_table(r: dict) -> str:
    lines = ["| dim | posterior std | spread of means | spread / std |", "|---:|---:|---:|---:|"]
    for i, (a, b, c) in enumerate(zip(r["posterior_std"], r["mean_spread"], r["snr"])):
        lines.append(f"| {i} | {_f(a)} | {_f(b)} | {_f(c, 2)} |")
    lines.append("")
    lines.append(f"{r['latents']} latents ({r['distinct_tokens']} distinct tokens): nearest "
                 f"neighbour encodes another token for {100 * r['nn_other_token']:.1f}%; "
                 f"collisions (another token's mean inside the posterior noise radius) "
                 f"{100 * r['collisions']:.1f}%; mean nearest-neighbour distance "
                 f"{r['mean_nn_distance']:.3f} against a mean noise radius "
                 f"{r['mean_noise_radius']:.3f} (normalized units).")
    return "\n".join(lines)


def decoder_table(r: dict) -> str:
    lines = ["| noised to t | token accuracy |", "|---:|---:|"]
    lines += [f"| {t:g} | {100 * a:.2f}% |" for t, a in zip(r["times"], r["accuracy"])]
    return "\n".join(lines) + f"\n\n({r['tokens']} held-out tokens)"


# ----------------------------------------------------------------------------- the command


def _held_out_batches(model, args) -> list[dict]:
    from tasks.text_to_text import heldout_texts
    from unified.data.streams import pack_batches

    texts = heldout_texts(args.data, args.max_docs)
    if not texts:
        raise ValueError(f"no held-out documents in {args.data}")
    return list(pack_batches(texts, model.tokenizer, seq_len=model.vae.config.max_len,
                             batch_size=8, drop_last=False,
                             multiple_of=model.vae.config.patch_size))


def command(args) -> str:
    """The command line that repeats this run, every setting spelled out."""
    join = lambda xs: ",".join(f"{x:g}" for x in xs)  # noqa: E731
    argv = ["cola", "eval", "diagnostics", "--checkpoint", str(args.checkpoint),
            "--parts", ",".join(args.parts)]
    if {"history", "geometry", "decoder"} & set(args.parts):
        argv += ["--data", str(args.data), "--max-docs", str(args.max_docs)]
        if "history" in args.parts:
            argv += ["--posterior", args.posterior]
    if {"prompts", "sweep"} & set(args.parts):
        argv += [*(["--prompts", args.prompts] if args.prompts else []), "--seeds", str(args.seeds),
                 "--new-tokens", str(args.new_tokens), "--steps", str(args.steps),
                 "--text-guidance", f"{args.text_guidance:g}"]
    if "sweep" in args.parts:
        argv += ["--guidance-sweep", join(args.guidance_sweep), "--steps-sweep",
                 join(args.steps_sweep), "--noise-scale-sweep", join(args.noise_scale_sweep)]
    return shlex.join(argv)


def run(args) -> str:
    """Run the chosen parts on `args.checkpoint`; print and return the markdown report."""
    from unified.baselines import load_model
    from unified.model import ColaModel, default_device

    if args.seeds < 2:
        raise ValueError(f"--seeds must be >= 2, got {args.seeds}")
    prompts = D.read_prompts(args.prompts) if args.prompts else list(D.DEFAULT_PROMPTS)
    seeds = list(range(args.seeds))
    device = default_device()
    model = load_model(args.checkpoint, device)
    cola = isinstance(model, ColaModel)
    mdlm = getattr(model, "kind", "") == "mdlm"  # its steps can be swept; an AR has none
    parts = [p for p in args.parts if cola or p == "prompts" or (p == "sweep" and mdlm)]
    skipped = [p for p in args.parts if p not in parts]
    out = [f"# Diagnostics of `{args.checkpoint}`", "",
           f"`{command(args)}` ({torch.get_num_threads()} threads, {device})"]
    if skipped:
        out.append(f"\n{', '.join(skipped)}: not defined for the {model.kind} baseline, skipped.")

    def section(title: str, fn) -> None:
        t0 = time.perf_counter()
        body = fn()
        out.extend(["", f"## {title} ({time.perf_counter() - t0:.0f} s)", "", body])
        print("\n".join(out[-4:]), flush=True)

    print("\n".join(out), flush=True)
    batches = _held_out_batches(model, args) if {"history", "geometry", "decoder"} & set(parts) \
        else []
    if "history" in parts:
        section(f"History gain of the held-out flow loss ({args.posterior} latents)",
                lambda: history_table(D.history_gain(model, batches, posterior=args.posterior)))
    base = dict(steps=args.steps, guidance=args.text_guidance, temperature=args.temperature,
                noise_scale=1.0)

    done: dict[tuple, dict] = {}  # a setting met twice (base, sweeps) is generated once

    def sensitivity(**kw) -> dict:
        setting = {**base, **kw}
        key = tuple(sorted(setting.items()))
        if key not in done:
            fn = D.generator_fn(model, args.new_tokens, **setting)
            done[key] = D.prompt_sensitivity(fn, prompts, seeds)
        return done[key]

    if "prompts" in parts:
        def prompts_part() -> str:
            r = sensitivity()
            label = (f"guidance {args.text_guidance:g}, {args.steps} steps" if cola
                     else f"temperature {args.temperature:g}")
            return "\n".join([*SENS_HEAD, sensitivity_row(label, r), "",
                              f"{len(prompts)} prompts x {len(seeds)} seeds, {args.new_tokens} "
                              f"new tokens each.", "", samples_block(r, prompts, seeds)])
        section("Prompt sensitivity (mean pairwise Jaccard overlap of word bigrams)", prompts_part)
    if "geometry" in parts:
        section("Latent geometry", lambda: geometry_table(
            D.latent_geometry(model, batches, max_latents=args.max_latents)))
    if "decoder" in parts:
        section("Decoder robustness", lambda: decoder_table(D.decoder_robustness(model, batches)))
    if "sweep" in parts:
        def sweep_part() -> str:
            rows = [*SENS_HEAD]
            if cola:
                for g in args.guidance_sweep:
                    rows.append(sensitivity_row(f"guidance {g:g}, {args.steps} steps",
                                                sensitivity(guidance=g)))
                for s in args.steps_sweep:
                    rows.append(sensitivity_row(f"guidance {args.text_guidance:g}, {s} steps",
                                                sensitivity(steps=s)))
                for ns in args.noise_scale_sweep:
                    rows.append(sensitivity_row(
                        f"guidance {args.text_guidance:g}, {args.steps} steps, noise {ns:g}",
                        sensitivity(noise_scale=ns)))
            else:
                for s in args.steps_sweep:
                    rows.append(sensitivity_row(f"{s} steps", sensitivity(steps=s)))
            return "\n".join(rows)
        section("Effect of the CFG scale, the number of steps and the starting noise on prompt "
                "sensitivity", sweep_part)
    text = "\n".join(out) + "\n"
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"\nwrote {args.markdown}")
    return text
