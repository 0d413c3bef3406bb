"""Load on `cola serve`: N concurrent streaming clients, with batching on and off.

    python bench/serve_load.py                          # bundled model; 1, 8, 16, 32 clients
    python bench/serve_load.py --clients 1,16 --max-tokens 64 --steps 8 --threads 2
    python bench/serve_load.py --clients 1,2 --max-tokens 16 --steps 1     # a quick smoke run

For each mode (batching on: --max-batch = the largest client count; off: --max-batch 1) a real
`cola serve` child process starts on a free loopback port and gets one untimed warm-up request.
Then, for each client count N, N clients (threads with the official `openai` client) start
at the same moment, each streaming one chat-free completion (its own prompt and seed; usage
from stream_options.include_usage). Printed per (mode, N): total tokens/s (all tokens / wall
time), tokens/s per client (median of tokens / own latency), time to the first block (p50,
p95), whole-request latency (p50, p95), errors, and total tokens/s over the 1-client figure.
Exit code 1 if any request failed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402

from unified.apps.cli_tasks import DEFAULT_CHECKPOINT  # noqa: E402
from unified.apps.process import ServeProcess  # noqa: E402

PROMPTS = ["The function returns", "Return the number of", "Open the file and read",
           "A list of the", "If the value is", "The path to the"]


def one(client: openai.OpenAI, i: int, args, barrier: threading.Barrier) -> dict:
    barrier.wait()
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(
        model="cola-demo" if args.model is None else args.model, prompt=PROMPTS[i % len(PROMPTS)],
        max_tokens=args.max_tokens, seed=i, stream=True, stream_options={"include_usage": True},
        extra_body={"steps": args.steps})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"start": t0, "end": end, "latency": end - t0, "first": first or end - t0,
            "tokens": tokens}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_clients(client: openai.OpenAI, n: int, args) -> dict:
    barrier = threading.Barrier(n)
    results, errors = [], []
    lock = threading.Lock()

    def worker(i):
        try:
            r = one(client, i, args, barrier)
            with lock:
                results.append(r)
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not results:
        return {"n": n, "errors": errors}
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"n": n, "errors": errors, "total_tps": tokens / wall, "tokens": tokens,
            "client_tps": statistics.median(r["tokens"] / r["latency"] for r in results),
            "first_p50": pct([r["first"] for r in results], 0.5),
            "first_p95": pct([r["first"] for r in results], 0.95),
            "lat_p50": pct([r["latency"] for r in results], 0.5),
            "lat_p95": pct([r["latency"] for r in results], 0.95)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--model", default=None, help="the served model id (default: cola-demo)")
    ap.add_argument("--clients", default="1,8,16,32", help="comma-separated client counts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="ODE steps per block")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads in the server")
    ap.add_argument("--modes", default="on,off", help="batching on, off, or both")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    rows, failed = [], False
    for mode in args.modes.split(","):
        max_batch = max(counts) if mode == "on" else 1
        with ServeProcess(args.checkpoint, max_batch=max_batch, max_queue=max(counts) + 8,
                          threads=args.threads, timeout=300) as url:
            client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0,
                                   timeout=1800)
            run_clients(client, 1, args)  # warm-up, not reported
            for n in counts:
                r = run_clients(client, n, args)
                rows.append((mode, r))
                failed |= bool(r["errors"])
                for e in r["errors"][:3]:
                    print(f"  ERROR ({mode}, {n} clients): {e}", file=sys.stderr)
    print(f"cola serve, {args.checkpoint}: max_tokens {args.max_tokens}, {args.steps} steps per "
          f"block, {args.threads} torch thread(s)")
    head = (f"{'batching':>8} {'clients':>7} {'tok/s all':>9} {'tok/s each':>10} "
            f"{'1st p50':>7} {'1st p95':>7} {'lat p50':>7} {'lat p95':>7} {'errors':>6} "
            f"{'x 1-client':>10}")
    print(head)
    print("-" * len(head))
    base = {m: r.get("total_tps") for m, r in rows if r["n"] == 1}
    for mode, r in rows:
        if "total_tps" not in r:
            print(f"{mode:>8} {r['n']:>7} {'-':>9} (all {len(r['errors'])} requests failed)")
            continue
        x = f"{r['total_tps'] / base[mode]:.2f}" if base.get(mode) else "-"
        print(f"{mode:>8} {r['n']:>7} {r['total_tps']:>9.1f} {r['client_tps']:>10.2f} "
              f"{r['first_p50']:>6.2f}s {r['first_p95']:>6.2f}s {r['lat_p50']:>6.2f}s "
              f"{r['lat_p95']:>6.2f}s {len(r['errors']):>6} {x:>10}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
