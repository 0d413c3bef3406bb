"""Load on the Gradio demo: N users send a request at the same moment; prints the latency
spread (min / median / max) per task and overall, and fails if any request errors.

    python bench/demo_load.py                         # bundled checkpoint, 16 users
    python bench/demo_load.py --checkpoint DIR --users 32 --concurrency 2 --threads 2

The server is a real `cola demo` child process on a free loopback port; requests go through
gradio_client. Tasks rotate text-to-text, image-to-text, text-to-image (the image tasks only
when the model has an image side).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gradio_client import Client, handle_file  # noqa: E402

from demo.examples import load_examples  # noqa: E402
from demo.process import DemoProcess  # noqa: E402
from unified.apps.cli import DEFAULT_CHECKPOINT  # noqa: E402


def request(client: Client, task: str, i: int) -> tuple[str, float, str]:
    ex = load_examples()
    t0 = time.perf_counter()
    if task == "text":
        out = client.predict(ex.text_prompts[i % len(ex.text_prompts)], 32, 8, 2.0, 1.0, 0.0, i,
                             api_name="/generate_text")
    elif task == "caption":
        img = ex.images[i % len(ex.images)]
        out = client.predict(handle_file(str(img.path)), img.question, img.prefix, 48, 8, 2.0,
                             1.0, 0.0, i, api_name="/caption")
    else:
        out = client.predict(ex.image_prompts[i % len(ex.image_prompts)], 16, 4.0, 1.0, i, 4,
                             api_name="/text_to_image")
    return task, time.perf_counter() - t0, out[-1]


def spread(xs: list[float]) -> str:
    return (f"min {min(xs):6.2f} s  median {statistics.median(xs):6.2f} s  "
            f"max {max(xs):6.2f} s  (n={len(xs)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=2, help="the server's concurrency limit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    args = ap.parse_args()

    from unified.apps.pipeline import UnifiedPipeline

    sees = UnifiedPipeline.from_pretrained(args.checkpoint, device="cpu").can_see_images
    tasks = ["text", "caption", "image"] if sees else ["text"]
    with DemoProcess(args.checkpoint, threads=args.threads, concurrency=args.concurrency) as url:
        client = Client(url, verbose=False)
        for task in tasks:  # warm-up: one request of each task, not timed
            request(client, task, 0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.users) as pool:
            futures = [pool.submit(request, client, tasks[i % len(tasks)], i)
                       for i in range(args.users)]
            results, errors = [], []
            for f in futures:
                try:
                    results.append(f.result())
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e))
        wall = time.perf_counter() - t0
    print(f"{args.users} simultaneous users, server concurrency {args.concurrency}, "
          f"{args.threads} torch thread(s), checkpoint {args.checkpoint}")
    for task in tasks:
        xs = [t for k, t, _ in results if k == task]
        if xs:
            print(f"  {task:>8}: {spread(xs)}")
    if results:
        print(f"  {'all':>8}: {spread([t for _, t, _ in results])}; wall {wall:.2f} s")
    for e in errors:
        print(f"  ERROR: {e}")
    print(f"{len(results)} completed, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
