"""The `cola` command line (the composition root: the one place that wires everything up).

    cola make-shards text --default-corpus --output data/stdlib
    cola make-shards text notes.txt more.jsonl --output data/mine
    cola make-shards shapes --n-train 20000 --n-heldout 500 --output data/shapes
    cola make-shards textworld --n-train 20000 --n-heldout 500 --output data/textworld
    cola train --preset text-default --stage 1 --out runs/s1
    cola train --preset text-default --stage 2 --init runs/s1/final --out runs/s2
    cola export runs/s2/final demo/checkpoint --force
    cola export runs/s2/checkpoints/step-00002000 mid-run --ema
    cola generate "The function returns" --max-new-tokens 64 --guidance 2 --seed 0
    cola caption scene.png --question "how many objects are there?"
    cola imagine "a large red circle at the top left" -o out.png --trajectory strip.png
    cola demo                      # the Gradio demo on http://127.0.0.1:7860
    cola serve                     # an OpenAI-compatible API on http://127.0.0.1:8000/v1
    cola eval text-vae --checkpoint demo/checkpoint
    cola eval diagnostics --checkpoint demo/checkpoint --markdown diagnostics.md
    cola eval textworld --checkpoint runs/s2/final -n 400
    cola latent-stats --vae runs/image-vae --data data/shapes/train
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from unified.apps.cli_tasks import DEFAULT_CHECKPOINT, UserError, add_parsers, writable_folder

log = logging.getLogger("cola.cli")

__all__ = ["DEFAULT_CHECKPOINT", "UserError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """Reports a usage error (a bad number, a missing argument) as one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _threads() -> None:
    n = os.environ.get("COLA_THREADS")
    if n:
        import torch

        torch.set_num_threads(int(n))


# --------------------------------------------------------------------------- subcommands
def cmd_make_shards(args) -> None:
    from unified.data.shards import make_default_corpus_shards, read_text_inputs, write_text_shards

    writable_folder(args.output, "--output")
    if args.kind == "shapes":
        from tasks.shapes.world import make_shapes_shards

        counts = make_shapes_shards(args.output, n_train=args.n_train, n_heldout=args.n_heldout,
                                    difficulty=args.difficulty, seed=args.seed,
                                    max_per_shard=args.max_per_shard)
        print(f"wrote the shapes world to {args.output}: {counts}")
        return
    if args.kind == "textworld":
        from unified.apps.textworld import make_shards

        make_shards(args)
        return
    if args.default_corpus:
        counts = make_default_corpus_shards(args.output, max_per_shard=args.max_per_shard)
        print(f"wrote the default corpus to {args.output}: {counts}")
        return
    if not args.inputs:
        raise UserError("give input .txt/.jsonl files, or --default-corpus")
    paths = write_text_shards(read_text_inputs(args.inputs), args.output, prefix=args.prefix,
                              max_per_shard=args.max_per_shard)
    print(f"wrote {len(paths)} shard(s) to {args.output}")


def cmd_train(args) -> None:
    from unified.config import load_preset
    from unified.training.distributed import cleanup
    from unified.training.trainer import Trainer

    writable_folder(args.out, "--out")
    cfg = load_preset(args.preset, args.set)
    tasks = None
    if cfg.data.pairs:  # a unified preset: image-text records become task samples
        from tasks import TaskMixture

        tasks = TaskMixture(cfg)
    trainer = Trainer(cfg, args.stage, args.out, init=args.init, resume=args.resume, tasks=tasks)
    if trainer.device.type == "cpu":  # reuse freed activations instead of page-faulting them
        from unified.training.malloc import keep_freed_memory  # in again every step

        keep_freed_memory()  # process-wide: the command's to set, not the Trainer's
    try:
        trainer.train(max_steps=args.max_steps)
    finally:
        cleanup(trainer.dist)


MODEL_ENTRIES = {"model_index.json", "text_vae", "prior", "image_vae", "tokenizer"}


def check_export_destination(dst: Path, force: bool) -> bool:
    """Whether `dst` holds a Cola model folder that will be replaced (with `force`); a
    UserError, before any work, for anything that must not be touched or cannot be written:
    a missing parent folder (never created silently), a file, a non-empty folder that is not
    a Cola model folder (or holds anything else besides one), a model folder without --force."""
    parent = dst.parent
    if not parent.is_dir():
        raise UserError(f"the folder {parent} does not exist (create it first; it is not "
                        f"created for you)")
    if not dst.exists() and not dst.is_symlink():
        return False
    if not dst.is_dir() or dst.is_symlink():
        raise UserError(f"{dst} exists and is not a folder; give another destination")
    entries = {p.name for p in dst.iterdir()}
    if not entries:
        return False
    if "model_index.json" not in entries:
        raise UserError(f"{dst} is not empty and is not a Cola model folder (no model_index.json);"
                        f" nothing was written: give an empty or new folder")
    other = sorted(entries - MODEL_ENTRIES)
    if other:
        raise UserError(f"{dst} holds a Cola model and other files ({', '.join(other[:3])}"
                        f"{', ...' if len(other) > 3 else ''}); nothing was written: move them "
                        f"or give another destination")
    if not force:
        raise UserError(f"{dst} already holds a Cola model; pass --force to replace it")
    return True


def export_source(src: str | Path, ema: bool = False):
    """The model in a model folder, or in a training checkpoint (runs/X/checkpoints/step-N,
    sharded or not); `ema`: with the checkpoint's EMA prior."""
    from unified.model import ColaModel

    src = Path(src)
    if not (src / "trainer.json").is_file():
        if ema:
            raise UserError(f"--ema needs a training checkpoint (a runs/NAME/checkpoints/step-N "
                            f"folder); {src} is a model folder (a run's final/ already holds "
                            f"its EMA prior)")
        return ColaModel.from_pretrained(src)
    if (src / "model-shard-0.safetensors").is_file():
        from unified.training.fsdp import load_sharded_model

        model = load_sharded_model(src)
    else:
        model = ColaModel.from_pretrained(src / "model")
    if ema:
        if not (src / "ema_prior" / "config.json").is_file():
            raise UserError(f"{src} has no EMA prior (trained with stage2.ema_decay = 0)")
        from prior.dit import DiT

        model = model.with_prior(DiT.from_pretrained(src / "ema_prior", low_cpu_mem_usage=False))
    return model.float().eval()


def cmd_export(args) -> None:
    import tempfile

    import torch

    dst = Path(args.dst)
    replace = check_export_destination(dst, args.force)
    try:  # the temporary folder is written first: an unwritable parent fails before the work
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.export-"))
    except OSError as e:
        raise UserError(f"cannot write to the folder {dst.parent} ({e.strerror})") from None
    old = None
    try:
        model = export_source(args.src, args.ema)
        if args.dtype == "bf16":
            model.to(torch.bfloat16)
        model.save_pretrained(tmp)
        if dst.exists():  # an empty folder, or a Cola model folder (--force): swapped out
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
            dst.rename(old / dst.name)
        tmp.rename(dst)
    except BaseException:
        if old is not None and not dst.exists():  # put the old folder back
            (old / dst.name).rename(dst)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    print(f"exported {args.src} -> {dst}" + (" (replaced the model that was there)"
                                             if replace else ""))


def _load(checkpoint: str):

    from unified.model import ColaModel, default_device

    return ColaModel.from_pretrained(checkpoint, device=default_device())


def _shapes_heldout(args, model) -> str:
    """The held-out shapes data: `--shapes-data` when it exists, else the same scenes
    `cola make-shards shapes` would hold out (evaluation seeds, never training ones), drawn
    now into a temporary folder. Resolved before any evaluation runs."""
    if model.image_vae is None:
        raise UserError(f"{args.checkpoint} has no image side: `cola eval shapes` needs a "
                        "unified model")
    if Path(args.shapes_data).exists():
        return args.shapes_data
    import tempfile

    from tasks.shapes.world import make_shapes_shards

    out = Path(tempfile.mkdtemp(prefix="cola-shapes-eval-"))
    log.warning("no held-out shapes data at %s: drawing %d held-out scenes (difficulty %d, "
                "evaluation seeds) into %s", args.shapes_data, args.n, args.shapes_difficulty, out)
    make_shapes_shards(out, 0, args.n, difficulty=args.shapes_difficulty,
                       image_size=model.image_size)
    return str(out / "heldout")


def cmd_eval(args) -> None:
    if args.what in ("diagnostics", "textworld"):  # Cola or baseline folders
        if args.what == "diagnostics":
            from unified.apps.diagnostics_report import run
        else:
            from unified.apps.textworld import run
        run(args)
        return
    model = _load(args.checkpoint)
    report = {}
    shapes_data = _shapes_heldout(args, model) if args.what in ("shapes", "all") else None
    if args.what in ("text-vae", "all"):
        from tasks.text_to_text import evaluate_text_vae

        report.update(evaluate_text_vae(model, args.data, max_docs=args.max_docs))
    if args.what in ("shapes", "all"):
        from tasks import image_to_text
        from tasks.shapes.benchmark import evaluate_shapes
        from unified.generate import GenerationConfig, ImageGenerationConfig

        report.update(evaluate_shapes(
            model, shapes_data, n=args.n,
            text_gen=GenerationConfig(max_new_tokens=min(image_to_text.MAX_NEW_TOKENS,
                                                     model.vae.config.max_len - 1),
                                      steps=args.steps,
                                      guidance=args.text_guidance,
                                      noise_scale=args.noise_scale),
            image_gen=ImageGenerationConfig(steps=args.image_steps, guidance=args.image_guidance),
            rerank=args.rerank, questions=args.questions, completions=args.completions))
    examples = report.pop("examples", [])
    completions = report.pop("completion_examples", [])
    for key, val in report.items():
        print(f"{key:>32}: {val:.4f}" if isinstance(val, float) else f"{key:>32}: {val}")
    for got, want in examples:
        print(f"  caption: {got!r}\n     true: {want!r}")
    for prompt, got in completions:
        print(f"  completion (text only): {prompt!r} -> {got!r}")


def cmd_latent_stats(args) -> None:
    import torch

    from unified.data.streams import SkipCounter, image_text_samples
    from vaes.image_vae import load_image_vae, measure_latent_stats, normalize, set_latent_stats

    vae = load_image_vae(args.vae).eval()
    skips = SkipCounter()
    images = [s["image"] for _, s in zip(range(args.max_images),
                                         image_text_samples(args.data, image_size=args.image_size,
                                                            skips=skips))]
    if not images:
        raise UserError(f"no readable images in {args.data}")
    batches = [torch.stack(images[i:i + 32]) for i in range(0, len(images), 32)]
    mean, std = measure_latent_stats(vae, batches)
    zn_mean = normalize(vae, mean.view(1, -1, 1, 1)).flatten()
    stored_scale = normalize(vae, (mean + std).view(1, -1, 1, 1)).flatten() - zn_mean
    print(f"{len(images)} images ({skips.total} skipped) from {args.data}")
    print(f"{'channel':>8}{'mean':>10}{'std':>10}{'normalized mean':>18}{'normalized std':>16}")
    for c in range(len(mean)):
        print(f"{c:>8}{mean[c]:>10.4f}{std[c]:>10.4f}{zn_mean[c]:>18.3f}{stored_scale[c]:>16.3f}")
    off = (zn_mean.abs() > 0.1) | ((stored_scale.log()).abs() > 0.2)
    if off.any():
        print(f"WARNING: the stored normalization is off for channels {off.nonzero().flatten().tolist()}"
              f" (normalized latents should have mean ~0 and std ~1); --write stores the measured"
              f" statistics in {args.vae}/config.json", file=sys.stderr)
    if args.write:
        set_latent_stats(vae, mean, std)
        vae.save_config(args.vae)
        print(f"stored per-channel latents_mean / latents_std in {args.vae}/config.json")


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from unified.generate import GenerationConfig, ImageGenerationConfig

    p = _Parser(prog="cola", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-shards", help="write webdataset shards")
    s.add_argument("kind", choices=["text", "shapes", "textworld"])
    s.add_argument("inputs", nargs="*", help=".txt / .jsonl files or folders")
    s.add_argument("--default-corpus", action="store_true",
                   help="the English prose of the Python standard library's docstrings")
    s.add_argument("--output", required=True)
    s.add_argument("--prefix", default="text")
    s.add_argument("--n-train", type=int, default=20000,
                   help="shapes / textworld: training scenes / problems")
    s.add_argument("--n-heldout", type=int, default=500,
                   help="shapes / textworld: held-out scenes / problems")
    s.add_argument("--difficulty", type=int, default=1, help="shapes: up to this many objects")
    s.add_argument("--seed", type=int, default=0, help="shapes / textworld: training stream seed")
    s.add_argument("--max-per-shard", type=int, default=2000)
    s.set_defaults(fn=cmd_make_shards)

    s = sub.add_parser("train", help="train stage 1 (VAE) or stage 2 (VAE + prior)")
    s.add_argument("--preset", required=True, help="name in configs/ or a .toml path")
    s.add_argument("--stage", type=int, choices=[1, 2], required=True)
    s.add_argument("--out", required=True, help="run folder (checkpoints, final model)")
    s.add_argument("--init", help="stage 2: the stage-1 model folder")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. optim.lr=3e-4 (repeatable)")
    s.add_argument("--max-steps", type=int, help="stop after this many more steps")
    s.add_argument("--resume", default="auto", metavar="auto|none|CHECKPOINT",
                   help="auto: continue from the newest complete checkpoint of --out (default); "
                        "none: start over; or a checkpoint folder")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("export", help="write a model folder (config.json + safetensors) from a "
                       "model folder or a training checkpoint into a new or empty folder")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="storage precision of the weights (loading always computes in fp32)")
    s.add_argument("--force", action="store_true",
                   help="replace a Cola model folder at DST (any other non-empty folder is "
                        "refused)")
    s.add_argument("--ema", action="store_true",
                   help="SRC is a training checkpoint: export it with its EMA prior")
    s.set_defaults(fn=cmd_export)

    add_parsers(sub)  # generate, caption, imagine, demo, serve

    s = sub.add_parser("latent-stats", help="per-channel latent statistics of an image VAE")
    s.add_argument("--vae", required=True, help="a diffusers AutoencoderKL folder")
    s.add_argument("--data", required=True, help="image-text shards (folder, file or pattern)")
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--max-images", type=int, default=2048)
    s.add_argument("--write", action="store_true", help="store the measured statistics")
    s.set_defaults(fn=cmd_latent_stats)

    s = sub.add_parser("eval", help="measure a model")
    s.add_argument("what", choices=["text-vae", "shapes", "all", "diagnostics", "textworld"],
                   help="all = text-vae + shapes")
    s.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    s.add_argument("--data", default="data/stdlib/heldout",
                   help="held-out prose shards (cola make-shards text --default-corpus)")
    s.add_argument("--max-docs", type=int, default=500)
    s.add_argument("--shapes-data", default="data/shapes/heldout",
                   help="held-out shapes shards (cola make-shards shapes)")
    s.add_argument("--shapes-difficulty", type=int, default=2,
                   help="shapes: objects per scene of the held-out scenes drawn when "
                        "--shapes-data does not exist (the bundled model's recipe: 2)")
    s.add_argument("-n", type=int, default=500, help="shapes / textworld: scenes / problems")
    s.add_argument("--steps", type=int, default=GenerationConfig.steps,
                   help="ODE steps per text block (shapes captions, textworld, diagnostics)")
    s.add_argument("--image-steps", type=int, default=ImageGenerationConfig.steps,
                   help="shapes: ODE steps per image")
    s.add_argument("--rerank", type=int, default=8, metavar="K",
                   help="shapes: also caption by choosing among K samples with the "
                        "text-to-image scorer, and answer questions by choosing among K "
                        "samples with the answer flow loss (0 = plain sampling only)")
    s.add_argument("--questions", type=int, default=100, metavar="N",
                   help="shapes: also answer every question about the first N scenes (0: none)")
    s.add_argument("--completions", type=int, default=100, metavar="N",
                   help="shapes: also complete the first N captions, cut after their first "
                        "colour word, with the text prior alone (text-to-text; 0: none)")
    s.add_argument("--text-guidance", type=float, default=GenerationConfig.guidance)
    s.add_argument("--noise-scale", type=float, default=GenerationConfig.noise_scale,
                   help="std of each text block's starting noise (shapes captions and answers, "
                        "textworld): 1 samples the flow, 0 follows it from the noise's mean")
    s.add_argument("--image-guidance", type=float, default=ImageGenerationConfig.guidance)
    from unified.apps import diagnostics_report, textworld

    diagnostics_report.add_arguments(s)
    textworld.add_arguments(s)
    s.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    _setup_logging(args.verbose)
    _threads()
    try:
        args.fn(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"cola {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
