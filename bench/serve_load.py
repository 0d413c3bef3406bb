"""Load on `cola serve`: N concurrent streaming clients, with batching on and off.

    python bench/serve_load.py                          # bundled model; 1, 8, 16, 32 clients
    python bench/serve_load.py --clients 1,16 --max-tokens 64 --steps 8 --threads 2
    python bench/serve_load.py --clients 1,2 --max-tokens 16 --steps 1 --rounds 1  # a smoke run

Both servers run at once (idle, a server takes no CPU): batching on (--max-batch = the largest
client count; text requests join the running batch at block boundaries) and off (--max-batch
1), each a real `cola serve` child process on a free loopback port with one untimed warm-up
request. For each client count N and each of `--rounds` rounds, the two modes are measured
one after the other (their order alternating by round), so that a drift in the machine's load
hits both alike. N clients (threads with the official `openai` client) start at the same
moment, each streaming one completion (its own prompt and seed; usage from
stream_options.include_usage). Printed per (mode, N), over the rounds: total tokens/s (all
tokens / wall time; the median round), tokens/s per client (median of tokens / own latency),
time to the first block (p50, p95) and whole-request latency (p50, p95) over every request,
the server's CPU time per generated token (less sensitive to other load on the machine than
wall time), errors, and total tokens/s over the same mode's 1-client figure. Exit code 1 if
any request failed. On a shared machine the wall-clock figures are not comparable between
runs: compare modes within one run, and prefer a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
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


def server_cpu(proc) -> float:
    """CPU seconds (user + system) the server process used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_clients(client: openai.OpenAI, n: int, args) -> tuple[list[dict], list[str], float]:
    """One round: n clients at once. Returns (results, errors, wall seconds)."""
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
    wall = max(r["end"] for r in results) - min(r["start"] for r in results) if results else 0
    return results, errors, wall


def summarize(n: int, rounds: list[tuple[list[dict], list[str], float]], cpu: float) -> dict:
    """Pool the rounds of one (mode, N)."""
    results = [r for rs, _, _ in rounds for r in rs]
    errors = [e for _, es, _ in rounds for e in es]
    out = {"n": n, "errors": errors}
    if not results:
        return out
    tokens = sum(r["tokens"] for r in results)
    return {**out, "tokens": tokens,
            "total_tps": statistics.median(sum(r["tokens"] for r in rs) / wall
                                           for rs, _, wall in rounds if rs and wall > 0),
            "client_tps": statistics.median(r["tokens"] / r["latency"] for r in results),
            "first_p50": pct([r["first"] for r in results], 0.5),
            "first_p95": pct([r["first"] for r in results], 0.95),
            "lat_p50": pct([r["latency"] for r in results], 0.5),
            "lat_p95": pct([r["latency"] for r in results], 0.95),
            "cpu_ms_tok": 1000 * cpu / max(1, tokens)}


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
    ap.add_argument("--rounds", type=int, default=3, help="rounds per (mode, clients)")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")
    servers = {m: ServeProcess(args.checkpoint, max_batch=max(counts) if m == "on" else 1,
                               max_queue=max(counts) + 8, threads=args.threads, timeout=300)
               for m in modes}
    rows, failed = [], False
    with contextlib.ExitStack() as stack:
        clients = {}
        for m, proc in servers.items():
            url = stack.enter_context(proc)
            clients[m] = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0,
                                       timeout=1800)
            run_clients(clients[m], 1, args)  # warm-up, not reported
        for n in counts:
            rounds = {m: [] for m in modes}
            cpu = dict.fromkeys(modes, 0.0)
            for k in range(args.rounds):
                for m in modes if k % 2 == 0 else modes[::-1]:
                    c0 = server_cpu(servers[m].proc)
                    rounds[m].append(run_clients(clients[m], n, args))
                    cpu[m] += server_cpu(servers[m].proc) - c0
            for m in modes:
                r = summarize(n, rounds[m], cpu[m])
                rows.append((m, r))
                failed |= bool(r["errors"])
                for e in r["errors"][:3]:
                    print(f"  ERROR ({m}, {n} clients): {e}", file=sys.stderr)
    print(f"cola serve, {args.checkpoint}: max_tokens {args.max_tokens}, {args.steps} steps per "
          f"block, {args.threads} torch thread(s), {args.rounds} round(s) each")
    head = (f"{'batching':>8} {'clients':>7} {'tok/s all':>9} {'tok/s each':>10} "
            f"{'1st p50':>7} {'1st p95':>7} {'lat p50':>7} {'lat p95':>7} {'cpu ms/tok':>10} "
            f"{'errors':>6} {'x 1-client':>10}")
    print(head)
    print("-" * len(head))
    base = {m: r.get("total_tps") for m, r in rows if r["n"] == 1}
    for mode, r in sorted(rows, key=lambda x: (modes.index(x[0]), x[1]["n"])):
        if "total_tps" not in r:
            print(f"{mode:>8} {r['n']:>7} {'-':>9} (all {len(r['errors'])} requests failed)")
            continue
        x = f"{r['total_tps'] / base[mode]:.2f}" if base.get(mode) else "-"
        print(f"{mode:>8} {r['n']:>7} {r['total_tps']:>9.1f} {r['client_tps']:>10.2f} "
              f"{r['first_p50']:>6.2f}s {r['first_p95']:>6.2f}s {r['lat_p50']:>6.2f}s "
              f"{r['lat_p95']:>6.2f}s {r['cpu_ms_tok']:>10.2f} {len(r['errors']):>6} {x:>10}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
