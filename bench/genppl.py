"""Text quality, measured: generative perplexity of Cola, AR and MDLM samples under a judge.

    python -m bench.genppl --judge runs/prose/judge-ar-2400/final \
        --model "AR, 76 TFLOP" runs/prose/ar-600/final \
        --model "Cola, 76 TFLOP" runs/prose/cola-s2-200-300/final --data data/stdlib/heldout

Run it as a module from the checkout (`python -m bench...`); bench/prose_compare.py trains the
contestants at matched FLOPs and the judge, then calls it. Each of the first -n held-out
documents of the corpus with more than --prompt-tokens tokens gives a prompt (its first
--prompt-tokens tokens, [bos] included) and a real continuation (its next tokens, up to
--new-tokens). Every model continues every prompt by --new-tokens tokens; by default EOS ends a
sample early and the mean length is reported beside the figure, with --ignore-eos no model may
emit EOS, so every sample has exactly --new-tokens tokens. The judge, an AR LM that should be
stronger than every contestant (bench/prose_compare.py trains it with several times the largest
budget), scores each continuation after its prompt. Reported per source: gen-PPL = exp(mean
NLL per token, pooled), the mean unigram entropy of a sample (nats; low = repetitive), the mean
length; and, for AR contestants and the judge, the perplexity of the real held-out
continuations under that model (the judge's must be the lowest: it is the stronger model).

Sampling: AR ancestral (temperature 1); MDLM LLaDA block-wise (block 16, --mdlm-steps per block,
temperature 1); Cola at its model's block size, --cola-steps Euler steps per block, each CFG
scale of --guidance, the flow's noise at scale 1 (its temperature 1), the decoder greedy (the
flow is the sampler).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from tasks.text_to_text import generative_perplexity
from unified.baselines import ARModel, MDLMModel, load_model, prompt_ids
from unified.data.streams import text_samples
from unified.generate import GenerationConfig, TextGenerator
from unified.model import ColaModel


def heldout_prompts(tok, data: str, n: int, prompt_tokens: int, new_tokens: int):
    """(prompt strings, prompt ids, real continuations) of the first n usable documents: longer
    than the prompt, and whose prompt text tokenizes back to the same ids. A real continuation
    is the document's next tokens, up to new_tokens (shorter where the document ends)."""
    prompts, ids, real = [], [], []
    for text in text_samples(data, resample=False):
        doc = prompt_ids(tok, text)
        if len(doc) <= prompt_tokens:
            continue
        p = tok.decode(doc[1:prompt_tokens])
        if prompt_ids(tok, p) != doc[:prompt_tokens]:
            continue
        prompts.append(p)
        ids.append(doc[:prompt_tokens])
        real.append(doc[prompt_tokens:prompt_tokens + new_tokens])
        if len(prompts) == n:
            break
    return prompts, ids, real


def train_tokens(folder: str | Path) -> int:
    """Token positions (steps x batch x seq_len) of the one-stage run (AR or MDLM) whose final
    model is `folder`, from that run's config.json; 0 when unknown. (A Cola model's budget is
    two stages; bench/prose_compare.py names it in the model's label, in FLOPs.)"""
    cfg_file = Path(folder).parent / "config.json"
    if not cfg_file.is_file():
        return 0
    cfg = json.loads(cfg_file.read_text())
    return cfg["stage1"]["steps"] * cfg["data"]["batch_size"] * cfg["data"]["seq_len"]


def cola_samples(model, prompts, args, guidance: float) -> list[list[int]]:
    engine = TextGenerator(model)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, steps=args.cola_steps,
                           guidance=guidance, temperature=0.0, seed=args.seed,
                           ignore_eos=args.ignore_eos)
    out = []
    for i in range(0, len(prompts), args.batch):
        rows = [[] for _ in prompts[i:i + args.batch]]
        for block in engine.stream(prompts[i:i + args.batch], gen):
            for r, new in enumerate(block.new_ids):
                rows[r].extend(new)
        out.extend(rows)
    return out


def batched(fn, ctx: list[list[int]], batch: int) -> list[list[int]]:
    return [x for i in range(0, len(ctx), batch) for x in fn(ctx[i:i + batch])]


def heldout_ppl(model: ARModel, ctx: list[list[int]], real: list[list[int]]) -> float:
    """Perplexity of the real continuations under an AR model (pooled over tokens)."""
    nll = model.nll(ctx, real)
    return math.exp(float(sum(x.sum() for x in nll)) / sum(len(x) for x in nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", required=True, help="an AR baseline folder (the judge)")
    ap.add_argument("--judge-name", default="the judge", help="its label in the table")
    ap.add_argument("--model", nargs=2, action="append", default=[], metavar=("NAME", "FOLDER"),
                    help="a contestant (AR, MDLM or Cola, told apart by its folder); repeatable")
    ap.add_argument("--data", default="data/stdlib/heldout")
    ap.add_argument("-n", type=int, default=256, help="held-out prompts (at most)")
    ap.add_argument("--prompt-tokens", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="fixed-length samples: no model may emit EOS")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--cola-steps", type=int, default=8)
    ap.add_argument("--mdlm-steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    judge = load_model(args.judge)
    if not isinstance(judge, ARModel):
        raise SystemExit(f"--judge {args.judge} is not an AR baseline")
    tok = judge.tokenizer
    prompts, ctx, real = heldout_prompts(tok, args.data, args.n, args.prompt_tokens,
                                         args.new_tokens)
    eos_rule = ("exactly" if args.ignore_eos else "up to (EOS ends a sample)")
    print(f"{len(prompts)} held-out prompts of {args.prompt_tokens} tokens, {eos_rule} "
          f"{args.new_tokens} new tokens each; judge: {args.judge_name} ({args.judge}); "
          f"{torch.get_num_threads()} threads", flush=True)
    judge_params = f"{sum(p.numel() for p in judge.parameters()) / 1e6:.1f}M"
    rows = [("held-out text", "", 0, "", real, 0.0),
            (f"judge: {args.judge_name}", judge_params, train_tokens(args.judge),
             f"{heldout_ppl(judge, ctx, real):.1f}", None, 0.0)]

    def add(name, model, folder, fn):
        t0 = time.perf_counter()
        with torch.no_grad():
            samples = fn()
        n_params = sum(p.numel() for p in model.parameters())
        own = f"{heldout_ppl(model, ctx, real):.1f}" if isinstance(model, ARModel) else ""
        n_tok = 0 if isinstance(model, ColaModel) else train_tokens(folder)
        rows.append((name, f"{n_params / 1e6:.1f}M", n_tok, own, samples,
                     time.perf_counter() - t0))

    for name, folder in args.model:
        model = load_model(folder)
        if model.tokenizer.get_vocab() != tok.get_vocab():
            raise SystemExit(f"{name} ({folder}) does not share the judge's tokenizer")
        if isinstance(model, ARModel):
            add(f"{name}, T=1", model, folder, lambda m=model: batched(
                lambda c: m.generate_ids(c, args.new_tokens, temperature=1.0, seed=args.seed,
                                         ignore_eos=args.ignore_eos), ctx, args.batch))
        elif isinstance(model, MDLMModel):
            add(f"{name}, T=1, 16/{args.mdlm_steps}", model, folder, lambda m=model: batched(
                lambda c: m.generate_ids(c, args.new_tokens, block_size=16,
                                         steps=args.mdlm_steps, temperature=1.0,
                                         seed=args.seed, ignore_eos=args.ignore_eos),
                ctx, args.batch))
        elif isinstance(model, ColaModel):
            for g in args.guidance:
                add(f"{name}, CFG {g:g}, {args.cola_steps} steps", model, folder,
                    lambda g=g, m=model: cola_samples(m, prompts, args, g))
        else:
            raise SystemExit(f"{folder}: not an AR, MDLM or Cola model")

    lines = [f"{len(prompts)} held-out prompts of {args.prompt_tokens} tokens, {eos_rule} "
             f"{args.new_tokens} new tokens; judge: {args.judge_name}", "",
             "| source | params | train tokens | held-out PPL | gen PPL | entropy | length |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    print(f"{'source':<48}{'params':>8}{'train tok':>11}{'own PPL':>9}{'gen PPL':>9}"
          f"{'entropy':>9}{'length':>8}{'gen s':>7}")
    for name, params, n_tok, own, samples, secs in rows:
        m = generative_perplexity(judge, ctx, samples) if samples is not None else None
        cells = [f"{m['gen_ppl']:.1f}", f"{m['entropy']:.2f}", f"{m['length']:.1f}"] if m \
            else ["", "", ""]
        n_tok = f"{n_tok / 1e6:.2f}M" if n_tok else ""
        print(f"{name:<48}{params:>8}{n_tok:>11}{own:>9}{cells[0]:>9}{cells[1]:>9}"
              f"{cells[2]:>8}{(f'{secs:.0f}' if secs else ''):>7}", flush=True)
        lines.append(f"| {name} | {params} | {n_tok} | {own} | " + " | ".join(cells) + " |")
    if args.table:
        args.table.write_text("\n".join(lines) + "\n")
    print(f"\nexample prompt: {prompts[0]!r}")
    for name, *_, samples, _ in rows:
        if samples is not None:
            print(f"  {name}: {tok.decode(samples[0])!r}")


if __name__ == "__main__":
    main()
