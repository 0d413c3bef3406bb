"""The `cola` subcommands that run a trained model (part of the composition root, unified/apps/cli.py):

    cola generate "The function returns" --max-new-tokens 64 --guidance 2 --seed 0
    cola caption scene.png [--question "how many objects are there?"] [--prefix "two objects:"]
                           [--candidates 8]
    cola imagine "a large red circle at the top left" -o out.png [--trajectory strip.png]
                 [--height 32 --width 64]
    cola demo [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--share]
    cola serve [--checkpoint DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

All of them load the bundled checkpoint unless told otherwise and go through UnifiedPipeline.
Every argument is checked by unified/apps/inputs.py (the pipeline's and the demo's checks)
before the model loads; a bad one is reported as one line (`cola CMD: error: ...`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from PIL import Image

log = logging.getLogger("cola.cli")

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "demo" / "checkpoint"


class UserError(Exception):
    """An error caused by the input; printed as one clear line, no traceback."""


def _pipeline(checkpoint: str):
    from unified.apps.pipeline import UnifiedPipeline

    return UnifiedPipeline.from_pretrained(checkpoint)


def _sampling(args) -> dict:
    """The sampler knobs given on the command line (None: the model's saved default)."""
    return dict(steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed,
                method=args.sampler)


def _check_knobs(**knobs) -> None:
    """Validate the knobs given before the model loads (fail fast, the pipeline's messages);
    the ones left out are the model's defaults, valid by construction."""
    from unified.apps import inputs

    inputs.knobs(**{k: v for k, v in knobs.items() if v is not None})


def _check_text_args(args, **extra) -> None:
    _check_knobs(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 noise_scale=args.noise_scale, **_sampling(args), **extra)


def cmd_generate(args) -> None:
    from unified.apps import inputs

    inputs.text("prompt", args.prompt)
    _check_text_args(args, top_k=args.top_k, top_p=args.top_p)
    pipe = _pipeline(args.checkpoint)
    print(args.prompt, end="", flush=True)
    shown = ""
    for out in pipe.generate_text(args.prompt, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, noise_scale=args.noise_scale, stream=True,
                                  **_sampling(args)):
        text = out.texts[0]
        print(text[len(shown):], end="", flush=True)
        shown = text
    print()


def cmd_caption(args) -> None:
    from unified.apps import inputs

    image = inputs.open_image(args.image)  # a missing or bad file fails before the model loads
    inputs.text("question", args.question or "", allow_empty=True)
    inputs.text("caption prefix", args.prefix, allow_empty=True)
    _check_text_args(args)
    inputs.whole("--candidates", args.candidates, 1, 64)
    pipe = _pipeline(args.checkpoint)
    out = pipe.caption(image, question=args.question, prefix=args.prefix,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       noise_scale=args.noise_scale, rerank=args.candidates, **_sampling(args))
    print(out.text)
    print(f"({out.seconds:.2f} s, {out.nfe} model evaluations)", file=sys.stderr)


def _probe_writable(folder: Path, what: str, path) -> None:
    """Create and remove a file in `folder`: the only sure test that it can be written."""
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cola-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write to the folder {folder} ({e.strerror})"
                        ) from None


def writable_file(path: str, what: str, suffixes: dict | None = None) -> Path:
    """An output file checked before the work: a known image type (with `suffixes`), not a
    folder, in an existing folder that can be written, not a read-only file."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise UserError(f"{what} {path}: unknown image type {p.suffix or '(no extension)'}; "
                        f"use .png")
    if not p.parent.is_dir():
        raise UserError(f"{what} {path}: the folder {p.parent} does not exist")
    _probe_writable(p.parent, what, path)
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{what} {path}: the file is read-only")
    return p


def writable_folder(path: str, what: str) -> Path:
    """An output folder checked before the work: not a file, and its nearest existing
    ancestor (the folder itself if it exists) can be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    existing = next(a for a in (p, *p.parents) if a.exists() or a == Path(a.anchor))
    if not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is a file, not a folder")
    _probe_writable(existing, what, path)
    return p


def _writable_image_path(path: str, what: str) -> Path:
    return writable_file(path, what, Image.registered_extensions())


def trajectory_strip(frames: list[Image.Image], scale: int = 4, gap: int = 2) -> Image.Image:
    """Frames side by side, each enlarged `scale` times (nearest neighbour), on white."""
    w, h = frames[0].width * scale, frames[0].height * scale
    strip = Image.new("RGB", (len(frames) * (w + gap) - gap, h), "white")
    for i, f in enumerate(frames):
        strip.paste(f.resize((w, h), Image.NEAREST), (i * (w + gap), 0))
    return strip


def cmd_imagine(args) -> None:
    out_path = _writable_image_path(args.output, "--output")
    strip_path = _writable_image_path(args.trajectory, "--trajectory") if args.trajectory else None
    from unified.apps import inputs

    inputs.text("prompt", args.prompt)
    _check_knobs(**_sampling(args))
    inputs.whole("--frames", args.frames, 1, 1000)
    for name in ("height", "width"):  # whole numbers now; multiples once the model is known
        if getattr(args, name) is not None:
            inputs.whole(f"--{name}", getattr(args, name), 1, inputs.MAX_IMAGE_SIDE)
    pipe = _pipeline(args.checkpoint)
    size = pipe.image_size(args.height, args.width, names=("--height", "--width"))
    res = pipe.text_to_image(args.prompt, trajectory=args.frames if strip_path else 0,
                             height=size[0], width=size[1], **_sampling(args))
    image = res.images[0]
    image.save(out_path)
    msg = f"wrote {out_path} ({image.width} x {image.height})"
    if strip_path:
        frames = [*res.trajectory[0], image]
        trajectory_strip(frames).save(strip_path)
        msg += f" and the trajectory {strip_path} ({len(frames)} frames, noise to image)"
    print(f"{msg} in {res.seconds:.2f} s, {res.nfe} model evaluations")


def cmd_demo(args) -> None:
    from demo.app import serve
    from unified.apps import inputs

    inputs.whole("--port", args.port, 1, 65535)
    inputs.whole("--concurrency", args.concurrency, 1, 64)
    inputs.whole("--max-queue", args.max_queue, 1, 10_000)

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the demo is reachable from other machines", args.host)
    if not os.environ.get("COLA_THREADS"):  # requests computed at once share the cores
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.concurrency)))
    pipe = _pipeline(args.checkpoint)
    log.info("loaded %s (%s)", args.checkpoint,
             "text and images" if pipe.can_see_images else "text only: no image side")
    bundled = Path(args.checkpoint).resolve() == DEFAULT_CHECKPOINT
    try:
        serve(pipe, host=args.host, port=args.port, share=args.share,
              concurrency=args.concurrency, max_queue=args.max_queue,
              title="demo/checkpoint (bundled)" if bundled else str(args.checkpoint))
    except OSError as e:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {e}") from None


# --------------------------------------------------------------------------- parsers
def _sampling_args(s: argparse.ArgumentParser, steps: int, guidance: float, text: bool) -> None:
    from prior.flow import SAMPLERS

    s.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="model folder (default: the bundled one)")
    model = "; default: the model's own (model_index.json generation)"
    s.add_argument("--steps", type=int, help=("ODE steps per block" if text else "ODE steps")
                   + f" (a new model: {steps}{model})")
    s.add_argument("--guidance", type=float, help=f"CFG scale, 1 = off (a new model: {guidance}"
                   f"{model})")
    s.add_argument("--shift", type=float, help=f"SD3 schedule shift{model}")
    s.add_argument("--sampler", choices=list(SAMPLERS), help=f"ODE solver{model}")
    s.add_argument("--seed", type=int, default=0)
    if text:
        s.add_argument("--temperature", type=float, help=f"0 = greedy{model}")
        s.add_argument("--noise-scale", type=float,
                       help=f"std of each block's starting noise, the flow's temperature{model}")


def add_parsers(sub) -> None:
    """Register generate, caption, imagine, demo and serve on the `cola` subparsers."""
    from tasks import image_to_text
    from unified.generate import GenerationConfig, ImageGenerationConfig

    d, di = GenerationConfig(), ImageGenerationConfig()
    s = sub.add_parser("generate", help="continue a text prompt")
    s.add_argument("prompt")
    _sampling_args(s, d.steps, d.guidance, text=True)
    s.add_argument("--max-new-tokens", type=int,
                   help=f"a new model: {d.max_new_tokens}; default: the model's own")
    s.add_argument("--top-k", type=int, help="default: the model's own (0 = off)")
    s.add_argument("--top-p", type=float, help="default: the model's own (1 = off)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("caption", help="describe an image, or answer a question about it")
    s.add_argument("image", help="an image file (resized to the model's image size)")
    s.add_argument("--question", help='e.g. "how many objects are there?"')
    s.add_argument("--prefix", default="", help="the start of the caption, to be continued")
    _sampling_args(s, d.steps, d.guidance, text=True)
    s.add_argument("--max-new-tokens", type=int,
                   help=f"a new model: {image_to_text.MAX_NEW_TOKENS}; default: the model's own")
    s.add_argument("--candidates", type=int, default=1, metavar="K",
                   help="sample K answers and keep one: a caption the model best redraws the "
                        "image from (analysis by synthesis), an answer to --question the "
                        "model best explains (its flow loss); about K times slower")
    s.set_defaults(fn=cmd_caption)

    s = sub.add_parser("imagine", help="draw an image for a caption")
    s.add_argument("prompt")
    s.add_argument("-o", "--output", required=True, help="the image file to write (.png)")
    s.add_argument("--trajectory", metavar="STRIP.png",
                   help="also write the denoising trajectory as a strip of frames")
    s.add_argument("--frames", type=int, default=8, help="trajectory frames (with --trajectory)")
    s.add_argument("--height", type=int, help="image height in pixels, a multiple of the model's "
                   "image token size (default: the model's training size)")
    s.add_argument("--width", type=int, help="image width in pixels (default: the model's "
                   "training size); non-square sizes are allowed")
    _sampling_args(s, di.steps, di.guidance, text=False)
    s.set_defaults(fn=cmd_imagine)

    s = sub.add_parser("demo", help="start the Gradio demo (all three tasks in a browser)")
    s.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="model folder (default: the bundled one)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    s.add_argument("--concurrency", type=int, default=2,
                   help="requests computed at once (each gets cores / concurrency torch threads "
                        "unless COLA_THREADS is set)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting at most")
    s.set_defaults(fn=cmd_demo)

    from unified.apps.serve import add_parser as add_serve_parser

    add_serve_parser(sub)  # cola serve: the OpenAI-compatible HTTP API
