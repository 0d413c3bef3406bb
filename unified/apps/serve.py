"""`cola serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one UnifiedPipeline.

    cola serve [--checkpoint DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
               [--max-batch 16] [--max-queue 64] [--timeout 300]

The routes are in unified/apps/openai_app.py, the request checks in unified/apps/schemas.py,
the batching in unified/apps/batcher.py. This module stays light: `cola --help` does not load
the web stack or the model.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("cola.serve")
API_KEY_ENV = "COLA_API_KEY"


# --------------------------------------------------------------------------- the command
def cmd_serve(args) -> None:
    import uvicorn

    from prior.flow import check_int
    from unified.apps.cli_tasks import DEFAULT_CHECKPOINT, UserError, _pipeline
    from unified.apps.openai_app import create_app

    check_int("--port", args.port, 1, 65535)
    check_int("--max-batch", args.max_batch, 1, 256)
    check_int("--max-queue", args.max_queue, 1, 100_000)
    if not args.timeout > 0 or not args.batch_window_ms >= 0 or not args.max_body_mb > 0:
        raise UserError("--timeout and --max-body-mb must be > 0, --batch-window-ms >= 0")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the API is reachable from other machines%s", args.host,
                    "" if api_key else " and needs no key (set --api-key)")
    try:  # bind first: a taken port is reported before the model loads
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {e}") from None
    pipe = _pipeline(args.checkpoint)
    bundled = Path(args.checkpoint).resolve() == DEFAULT_CHECKPOINT
    model_id = args.model_name or ("cola-demo" if bundled else Path(args.checkpoint).name)
    app = create_app(pipe, model_id=model_id, api_key=api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, window=args.batch_window_ms / 1000,
                     timeout=args.timeout, max_body=int(args.max_body_mb * (1 << 20)))
    log.info("serving %s (%s) on http://%s:%d/v1 (batches of up to %d rows%s)", model_id,
             "text and images" if pipe.can_see_images else "text only", args.host, args.port,
             args.max_batch, ", API key required" if api_key else "")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def add_parser(sub) -> None:
    """Register `cola serve` on the `cola` subparsers."""
    from unified.apps.cli_tasks import DEFAULT_CHECKPOINT

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (completions, chat with "
                                     "images, image generation)")
    s.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="model folder (default: the bundled one)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    s.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    s.add_argument("--api-key", default=None,
                   help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV} if set)")
    s.add_argument("--model-name", default=None,
                   help="the model id clients send (default: cola-demo for the bundled model, "
                        "else the folder's name)")
    s.add_argument("--max-batch", type=int, default=16,
                   help="rows generated together at most; 1 = no batching (default: 16)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting at most, more are answered 429 (default: 64)")
    s.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="how long an idle server waits for batch mates of a first request "
                        "(default: 0: text requests join a running batch at its next block)")
    s.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a request may wait and run in all (default: 300)")
    s.add_argument("--max-body-mb", type=float, default=16.0, help="request body size limit (default: 16)")
    s.set_defaults(fn=cmd_serve)
