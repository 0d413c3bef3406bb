"""Generation throughput: Cola (KV cache, fused CFG) vs Cola without cache vs the matched AR.

    python -m bench.generation                        # issue 6: 256 and 1024 tokens, batch 1/8/16
    python -m bench.generation --tokens 256 --batch 1 8 --dtype fp32
    python -m bench.generation --profile              # torch.profiler tables of one run each

Run it as a module from the checkout (`python -m bench...`) so it imports this checkout's code.
Models have random weights (speed does not depend on them); EOS is disabled so every run
generates exactly --tokens tokens. Reference size of issue 6: Cola DiT 8 layers x 512 (block 16,
AdaLN-single) + Text VAE 2+2 blocks x 512 with an 8192-token vocabulary; the AR baseline is
unified.baselines.ARModel (a transformers Llama, width 512, SwiGLU 2048, KV-cached `generate`,
greedy) whose depth matches Cola's parameter count within 10%. Every figure comes from this
one run on this machine; the script prints the ratios and checks them against issue 6's
targets.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from bench.timing import median_time
from prior.dit import DiT
from unified.baselines import ARModel, llama_config, matched_depth, prompt_ids
from unified.apps.cli import DEFAULT_CHECKPOINT
from unified.config import ACT
from unified.generate import GenerationConfig, TextGenerator
from unified.layout import TextLayoutConfig
from unified.model import ColaModel
from vaes.text_vae import TextVAE
from vaes.tokenizer import load_tokenizer

VOCAB = 8192
PROMPT = ("the value of the function is returned when the file is opened and read " * 4)[:150]


def build_cola(context: int, tokenizer=None, act: str = ACT) -> ColaModel:
    torch.manual_seed(0)
    tok = tokenizer or load_tokenizer(DEFAULT_CHECKPOINT / "tokenizer")
    vae = TextVAE(vocab_size=VOCAB, width=512, enc_layers=2, dec_layers=2, heads=8,
                  max_len=context, act=act)
    vae.set_latent_stats(torch.zeros(16), torch.ones(16))
    dit = DiT(modalities={"text": 16}, width=512, depth=8, heads=8, attn_backend="sdpa", act=act)
    with torch.no_grad():
        for p in dit.parameters():  # off AdaLN-zero so the DiT does real work
            p.add_(torch.randn_like(p) * 0.02)
        vae.head.bias[tok.eos_token_id] = -1e4  # never stop early
    return ColaModel(vae, dit, tok, TextLayoutConfig(block_size=16)).eval()


def build_ar(n_params: int, tokenizer) -> ARModel:
    """The AR baseline of width 512 (SwiGLU 2048) whose depth brings it closest to n_params."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    depth = matched_depth(n_params, VOCAB, 512, 2048)
    model = ARModel(LlamaForCausalLM(llama_config(VOCAB, 512, depth, 8, 2048, tokenizer)), tokenizer)
    n = model.num_parameters()
    if abs(n - n_params) > 0.1 * n_params:
        print(f"warning: AR has {n / 1e6:.1f}M params vs Cola {n_params / 1e6:.1f}M (> 10% apart)")
    return model.eval()


@torch.no_grad()
def ar_plain_loop(ar: ARModel, ids: list[list[int]], n: int) -> torch.Tensor:
    """Greedy KV-cached decoding in a bare loop over the AR's forward (no transformers
    `generate` machinery): a lower bound on what the AR's decoding needs (equal-length
    prompts, EOS never chosen)."""
    x = torch.tensor(ids)
    out = ar.net(input_ids=x, use_cache=True)
    new = []
    for _ in range(n):
        logits = out.logits[:, -1]
        logits[:, ar.tokenizer.eos_token_id] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        new.append(nxt)
        out = ar.net(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(new, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--uncached-batch", type=int, nargs="*", default=[1],
                    help="batches at which the slow no-cache reference is also timed")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--dtype", choices=["bf16", "bf16w", "fp32"], default="bf16",
                    help="bf16: autocast over fp32 weights; bf16w: both models' weights cast "
                         "to bf16 (no autocast); fp32")
    ap.add_argument("--act", choices=["gelu_tanh", "gelu"], default=ACT,
                    help="Cola's MLP activation (the AR's is Llama's SiLU)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the DiT blocks' element-wise regions (DiT.compile_blocks)")
    ap.add_argument("--ar-plain", action="store_true",
                    help="also time the AR in a bare KV-cached loop (no transformers generate)")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler tables of one Cola and one AR run per batch")
    args = ap.parse_args()
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16"
           else nullcontext())
    tok = load_tokenizer(DEFAULT_CHECKPOINT / "tokenizer")
    prompt = prompt_ids(tok, PROMPT)  # both models get these ids ([bos] + the prompt's)
    cola = build_cola(context=len(prompt) + max(args.tokens) + 16, tokenizer=tok, act=args.act)
    n_cola = sum(p.numel() for p in cola.parameters())
    ar = build_ar(n_cola, tok)
    n_ar = ar.num_parameters()
    if args.dtype == "bf16w":
        cola.to(torch.bfloat16)
        ar.to(torch.bfloat16)
    engine = TextGenerator(cola)
    if args.compile:
        cola.prior.compile_blocks()
        t0 = time.perf_counter()
        with torch.no_grad(), amp:
            list(engine.stream([PROMPT], GenerationConfig(max_new_tokens=32, steps=2)))
        print(f"compiled the DiT blocks in {time.perf_counter() - t0:.0f} s")
    n_dit = sum(p.numel() for p in cola.prior.parameters())
    print(f"Cola {n_cola / 1e6:.1f}M params (DiT {n_dit / 1e6:.1f}M, Text VAE "
          f"{(n_cola - n_dit) / 1e6:.1f}M), AR {n_ar / 1e6:.1f}M params "
          f"({ar.net.config.num_hidden_layers} layers, {n_ar / n_cola:.2f}x); {args.dtype}, act "
          f"{args.act}{', compiled' if args.compile else ''}, "
          f"{torch.get_num_threads()} threads, {args.steps} steps/block, CFG {args.guidance}, "
          f"block 16, {len(prompt)}-token prompt")
    print(f"{'tokens':>7}{'batch':>6}{'Cola':>10}{'no cache':>10}{'AR':>10}{'Cola/AR':>9}"
          f"{'cache/no cache':>16}" + (f"{'AR loop':>10}{'Cola/AR loop':>14}" if args.ar_plain
                                       else ""))
    results = {}
    for n in args.tokens:
        for b in args.batch:
            prompts, ids = [PROMPT] * b, [prompt] * b

            def run_cola(cache=True, n_new=n, prompts=prompts):
                gen = GenerationConfig(max_new_tokens=n_new, steps=args.steps,
                                       guidance=args.guidance)
                with torch.no_grad(), amp:
                    out = list(engine.stream(prompts, gen, use_cache=cache))
                assert sum(len(x) for o in out for x in o.new_ids) == n_new * len(prompts)

            def run_ar(n_new=n, ids=ids):
                with torch.no_grad(), amp:
                    out = ar.generate_ids(ids, n_new, ignore_eos=True)
                assert sum(map(len, out)) == n_new * len(ids)

            if args.profile:
                profile(f"Cola, batch {b}, {n} tokens", run_cola)
                profile(f"AR, batch {b}, {n} tokens", run_ar)
            t_cola = median_time(run_cola, lambda: run_cola(n_new=32))
            t_ar = median_time(run_ar, lambda: run_ar(n_new=32))
            t_nc = float("nan")
            if b in args.uncached_batch:
                t_nc = median_time(lambda: run_cola(False), lambda: run_cola(False, n_new=16),
                                   max_runs=1)
            tps = [n * b / t for t in (t_cola, t_nc, t_ar)]
            results[n, b] = tps
            extra = ""
            if args.ar_plain:
                def run_plain(n_new=n, ids=ids):
                    with amp:
                        assert ar_plain_loop(ar, ids, n_new).shape == (len(ids), n_new)
                plain = n * b / median_time(run_plain, lambda: run_plain(n_new=32))
                extra = f"{plain:>10.1f}{tps[0] / plain:>14.2f}"
            print(f"{n:>7}{b:>6}{tps[0]:>10.1f}{tps[1]:>10.1f}{tps[2]:>10.1f}"
                  f"{tps[0] / tps[2]:>9.2f}{tps[0] / tps[1]:>16.2f}{extra}", flush=True)
    print("(tokens/s, median of up to 3 runs; the ratios compare figures of this run)")
    check_targets(results)


def check_targets(results: dict) -> None:
    """Issue 6's targets on the 2-core CPU, where this run measured them."""
    checks = []
    if (256, 1) in results:
        c, _, a = results[256, 1]
        checks.append(("batch 1, 256 tokens: Cola >= 1.5x AR and >= 100 tok/s",
                       f"{c / a:.2f}x, {c:.0f} tok/s", c / a >= 1.5 and c >= 100))
    if (256, 8) in results:
        c, _, a = results[256, 8]
        checks.append(("batch 8, 256 tokens: Cola >= 1x AR", f"{c / a:.2f}x", c / a >= 1.0))
    if (1024, 1) in results and results[1024, 1][1] == results[1024, 1][1]:
        c, nc, _ = results[1024, 1]
        checks.append(("1024 tokens: KV cache >= 5x no cache", f"{c / nc:.1f}x", c / nc >= 5))
    for what, got, ok in checks:
        print(f"target {what}: {got} -> {'met' if ok else 'NOT met'}")


def profile(title: str, fn) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fn()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        fn()
    print(f"--- profile: {title}")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
