"""Text quality, measured: generative perplexity of Cola, AR and MDLM samples under the AR judge.

    python -m bench.genppl --cola runs/cola-s2/final --cola-s1 runs/cola-s1/final \\
        --ar runs/ar/final --mdlm runs/mdlm/final --data data/stdlib/heldout

Run it as a module from the checkout (`python -m bench...`). N held-out documents of the
default corpus give a prompt (their first --prompt-tokens tokens, [bos] included) and a real
continuation (the next --new-tokens). Every model continues every prompt by up to
--new-tokens tokens (stopping at EOS); the trained AR baseline, the judge, scores each
continuation after its prompt. Reported per source: gen-PPL = exp(mean NLL per token, pooled),
the mean unigram entropy of a sample (nats; low = repetitive), the mean length, and, for the
models, their parameters and training tokens (token positions: steps x batch x seq_len of
their runs' config.json). The AR judging its own samples measures how well it models its own
distribution; held-out text is the reference.

Sampling: AR ancestral (temperature 1); MDLM LLaDA block-wise (block 16, --mdlm-steps per block,
temperature 1); Cola block 16, --cola-steps Euler steps per block, each CFG scale of
--guidance, the decoder greedy (the flow is the sampler).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unified.baselines import ARModel, load_model, prompt_ids
from unified.data.streams import text_samples
from tasks.text_to_text import generative_perplexity
from unified.generate import GenerationConfig, TextGenerator


def heldout_prompts(tok, data: str, n: int, prompt_tokens: int, new_tokens: int):
    """(prompt strings, prompt ids, real continuations) of the first n usable documents: long
    enough, and whose prompt text tokenizes back to the same ids."""
    prompts, ids, real = [], [], []
    for text in text_samples(data, resample=False):
        doc = prompt_ids(tok, text)
        if len(doc) < prompt_tokens + new_tokens:
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


def train_tokens(folder: str | None, stage: int) -> int:
    """Token positions (steps x batch x seq_len) of the run whose final model is `folder`,
    from that run's config.json; 0 when unknown."""
    cfg_file = Path(folder).parent / "config.json" if folder else None
    if cfg_file is None or not cfg_file.is_file():
        return 0
    cfg = json.loads(cfg_file.read_text())
    return cfg[f"stage{stage}"]["steps"] * cfg["data"]["batch_size"] * cfg["data"]["seq_len"]


def cola_samples(model, prompts, args, guidance: float) -> list[list[int]]:
    engine = TextGenerator(model)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, steps=args.cola_steps,
                           guidance=guidance, temperature=0.0, seed=args.seed)
    out = []
    for i in range(0, len(prompts), args.batch):
        rows = [[] for _ in prompts[i:i + args.batch]]
        for block in engine.stream(prompts[i:i + args.batch], gen):
            for r, new in enumerate(block.new_ids):
                rows[r].extend(new)
        out.extend(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ar", required=True, help="the trained AR baseline (the judge)")
    ap.add_argument("--cola", help="a trained Cola model folder")
    ap.add_argument("--cola-s1", help="its stage-1 folder (to count stage-1 training tokens)")
    ap.add_argument("--mdlm", help="the trained masked-diffusion baseline")
    ap.add_argument("--data", default="data/stdlib/heldout")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    ap.add_argument("--cola-steps", type=int, default=8)
    ap.add_argument("--mdlm-steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    judge = load_model(args.ar)
    if not isinstance(judge, ARModel):
        raise SystemExit(f"--ar {args.ar} is not an AR baseline")
    tok = judge.tokenizer
    prompts, ctx, real = heldout_prompts(tok, args.data, args.n, args.prompt_tokens,
                                         args.new_tokens)
    print(f"{len(prompts)} held-out prompts of {args.prompt_tokens} tokens, up to "
          f"{args.new_tokens} new tokens each; judge: the AR baseline ({args.ar}); "
          f"{torch.get_num_threads()} threads")
    rows = [("held-out text", "", 0, 0, real, 0.0)]

    def add(name, model, n_tokens, fn):
        if model is not None and model.tokenizer.get_vocab() != tok.get_vocab():
            raise SystemExit(f"{name} does not share the judge's tokenizer")
        t0 = time.perf_counter()
        with torch.no_grad():
            samples = fn()
        n_params = sum(p.numel() for p in model.parameters())
        rows.append((name, f"{n_params / 1e6:.1f}M", n_tokens, 0, samples,
                     time.perf_counter() - t0))

    ar_gen = dict(temperature=1.0, seed=args.seed)
    add("AR (T=1)", judge, train_tokens(args.ar, 1), lambda: [
        x for i in range(0, len(ctx), args.batch)
        for x in judge.generate_ids(ctx[i:i + args.batch], args.new_tokens, **ar_gen)])
    if args.mdlm:
        mdlm = load_model(args.mdlm)
        add(f"MDLM (T=1, 16/{args.mdlm_steps})", mdlm, train_tokens(args.mdlm, 1), lambda: [
            x for i in range(0, len(ctx), args.batch)
            for x in mdlm.generate_ids(ctx[i:i + args.batch], args.new_tokens, block_size=16,
                                       steps=args.mdlm_steps, temperature=1.0, seed=args.seed)])
    if args.cola:
        cola = load_model(args.cola)
        n_cola = train_tokens(args.cola, 2) + train_tokens(args.cola_s1, 1)
        for g in args.guidance:
            add(f"Cola (CFG {g:g}, {args.cola_steps} steps)", cola, n_cola,
                lambda g=g: cola_samples(cola, prompts, args, g))
    print(f"{'source':<26}{'params':>8}{'train tok':>11}{'gen PPL':>9}{'entropy':>9}"
          f"{'length':>8}{'gen s':>7}")
    for name, params, n_tok, _, samples, secs in rows:
        m = generative_perplexity(judge, ctx, samples)
        print(f"{name:<26}{params:>8}{(f'{n_tok / 1e6:.2f}M' if n_tok else ''):>11}"
              f"{m['gen_ppl']:>9.1f}{m['entropy']:>9.2f}{m['length']:>8.1f}"
              f"{(f'{secs:.0f}' if secs else ''):>7}", flush=True)
    print(f"\nexample prompt: {prompts[0]!r}")
    for name, *_, samples, _ in rows:
        print(f"  {name}: {tok.decode(samples[0])!r}")


if __name__ == "__main__":
    main()
