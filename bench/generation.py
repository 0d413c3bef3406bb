"""Generation throughput: Cola (KV cache, fused CFG) vs Cola without cache vs a matched AR.

    python bench/generation.py                 # the reference size of issue 6, bf16, CPU
    python bench/generation.py --tokens 256 --batch 1 8 --dtype fp32

Models have random weights (speed does not depend on them); EOS is disabled so every run
generates exactly --tokens tokens. Reference size: Cola DiT 8 layers x 512 (block 16) + Text
VAE 2+2 blocks x 512 with an 8192-token vocabulary; the AR baseline is a transformers Llama
with KV cache (width 512, MLP 2048) whose depth matches Cola's parameter count within 10%.
All figures come from the same run on the same machine; the script prints their ratios.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from prior.dit import DiT
from unified.cli import DEFAULT_CHECKPOINT
from unified.generate import GenerationConfig, TextGenerator
from unified.layout import TextLayoutConfig
from unified.model import ColaModel
from vaes.text_vae import TextVAE
from vaes.tokenizer import load_tokenizer

VOCAB = 8192


def build_cola(context: int) -> ColaModel:
    torch.manual_seed(0)
    tok = load_tokenizer(DEFAULT_CHECKPOINT / "tokenizer")
    vae = TextVAE(vocab_size=VOCAB, width=512, enc_layers=2, dec_layers=2, heads=8,
                  max_len=context)
    vae.set_latent_stats(torch.zeros(16), torch.ones(16))
    dit = DiT(modalities={"text": 16}, width=512, depth=8, heads=8, attn_backend="sdpa")
    with torch.no_grad():
        for p in dit.parameters():  # off AdaLN-zero so the DiT does real work
            p.add_(torch.randn_like(p) * 0.02)
        vae.head.bias[tok.eos_token_id] = -1e4  # never stop early
    return ColaModel(vae, dit, tok, TextLayoutConfig(block_size=16)).eval()


def build_ar(n_params: int):
    """A Llama of width 512 whose depth brings its parameter count closest to `n_params`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    width, mlp = 512, 2048
    per_layer = 4 * width * width + 3 * width * mlp + 2 * width
    embed = 2 * VOCAB * width + width
    layers = max(1, round((n_params - embed) / per_layer))
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=mlp,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    if abs(n - n_params) > 0.1 * n_params:
        print(f"warning: AR has {n / 1e6:.1f}M params vs Cola {n_params / 1e6:.1f}M (> 10% apart)")
    return model


def time_it(fn, repeats: int = 1) -> float:
    fn()  # warm-up (allocations, lazy init)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-uncached", action="store_true", help="skip the slow reference path")
    args = ap.parse_args()
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16"
           else nullcontext())
    prompt_len = 32
    cola = build_cola(context=prompt_len + max(args.tokens) + 16)
    n_cola = sum(p.numel() for p in cola.parameters())
    ar = build_ar(n_cola)
    n_ar = sum(p.numel() for p in ar.parameters())
    engine = TextGenerator(cola)
    n_dit = sum(p.numel() for p in cola.prior.parameters())
    print(f"Cola {n_cola / 1e6:.1f}M params (DiT {n_dit / 1e6:.1f}M), AR {n_ar / 1e6:.1f}M params "
          f"({ar.config.num_hidden_layers} layers); {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps/block, CFG {args.guidance}")
    print(f"{'tokens':>7}{'batch':>6}{'Cola':>12}{'Cola nocache':>14}{'AR':>12}"
          f"{'Cola/AR':>9}{'cache/nocache':>15}")
    words = "the value of the function is returned when the file is opened and read "
    for n in args.tokens:
        for b in args.batch:
            prompts = [(words * 4)[: 150]] * b
            gen = GenerationConfig(max_new_tokens=n, steps=args.steps, guidance=args.guidance)
            ids = torch.randint(4, 4096, (b, prompt_len))

            def run_cola(cache=True, prompts=prompts, gen=gen, total=n * b):
                with torch.no_grad(), amp:
                    out = list(engine.stream(prompts, gen, use_cache=cache))
                assert sum(len(x) for o in out for x in o.new_ids) == total

            def run_ar(ids=ids, n=n):
                with torch.no_grad(), amp:
                    ar.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, pad_token_id=0)

            t_cola = time_it(run_cola)
            t_ar = time_it(run_ar)
            t_nc = float("nan") if args.no_uncached else time_it(lambda: run_cola(False))
            tps = [n * b / t for t in (t_cola, t_nc, t_ar)]
            print(f"{n:>7}{b:>6}{tps[0]:>12.1f}{tps[1]:>14.1f}{tps[2]:>12.1f}"
                  f"{tps[0] / tps[2]:>9.2f}{tps[0] / tps[1]:>15.2f}")
    print("(tokens/s; Cola/AR and cache/nocache are ratios of the same run)")


if __name__ == "__main__":
    main()
