"""The demo's event handlers: UI values in, pipeline call, display values out.

One `Handlers` object wraps the one shared `UnifiedPipeline`; each call keeps its own state
(the pipeline's generators and caches live inside the call), so concurrent requests do not
interfere. The pipeline validates every argument; its ValueErrors become `gr.Error`s, which
the browser shows as a toast and an API client receives as an exception with the message.
The parameter names of the handler methods are the API's parameter names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr
from PIL import Image

from demo.components import user_error
from demo.files import ImageFiles
from unified.apps.pipeline import UnifiedPipeline

log = logging.getLogger("cola.demo")


@contextmanager
def _as_user_errors():
    try:
        yield
    except ValueError as e:
        raise user_error(str(e)) from None


def stats_line(seconds: float, nfe: int, extra: str = "") -> str:
    """The latency line under every result: `0.84 s · 24 model evaluations (nfe) · ...`."""
    return f"{seconds:.2f} s · {nfe} model evaluations (nfe)" + (f" · {extra}" if extra else "")


def upscale(image: Image.Image, size: int) -> Image.Image:
    """Nearest-neighbour enlargement for display (pixels stay sharp squares) by the whole
    factor that brings the longer side closest to `size` (a square one to size x size)."""
    k = max(1, round(size / max(image.size)))
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.NEAREST)


class Handlers:
    """The three tasks as Gradio event handlers over one pipeline."""

    def __init__(self, pipe: UnifiedPipeline, display_size: int = 256,
                 files: ImageFiles | None = None):
        self.pipe = pipe
        self.display_size = display_size
        self.files = files or ImageFiles()

    def generate_text(self, prompt: str, max_new_tokens: int, steps: int, guidance: float,
                      shift: float, temperature: float, seed: int) -> Iterator[tuple[str, str]]:
        """Continue `prompt`; yields (continuation so far, stats) after every block."""
        t0 = time.perf_counter()
        text, nfe, tokens, blocks = "", 0, 0, 0
        with _as_user_errors():
            for out in self.pipe.generate_text(
                    prompt or "", max_new_tokens=max_new_tokens, steps=steps, guidance=guidance,
                    shift=shift, temperature=temperature, seed=seed, stream=True):
                text, nfe, blocks = out.texts[0], out.nfe, out.index + 1
                tokens += len(out.new_ids[0])
                done = "" if out.finished[0] else " (generating…)"
                yield text, stats_line(time.perf_counter() - t0, nfe,
                                       f"{tokens} tokens in {blocks} blocks{done}")
        seconds = time.perf_counter() - t0
        log.info("text-to-text: %d tokens, %.2f s, nfe %d", tokens, seconds, nfe)
        yield text, stats_line(seconds, nfe, f"{tokens} tokens in {blocks} blocks")

    def caption(self, image: str | Image.Image | None, question: str, prefix: str, max_new_tokens: int,
                steps: int, guidance: float, shift: float, temperature: float,
                seed: int, candidates: int = 1) -> tuple[str, str]:
        """Describe the image (or answer `question` about it), continuing `prefix`; with
        `candidates` K > 1 the caption or answer is chosen among K samples
        (UnifiedPipeline.caption's rerank)."""
        if image is None:
            raise user_error("no image: upload one or pick an example below")
        with _as_user_errors():
            out = self.pipe.caption(image, question=question or None, prefix=prefix or "",
                                    max_new_tokens=max_new_tokens, steps=steps,
                                    guidance=guidance, shift=shift, temperature=temperature,
                                    seed=seed, rerank=candidates)
        log.info("image-to-text: %.2f s, nfe %d", out.seconds, out.nfe)
        return out.text, stats_line(out.seconds, out.nfe)

    def text_to_image(self, prompt: str, steps: int, guidance: float, shift: float, seed: int,
                      frames: int, height: int | None = None, width: int | None = None,
                      progress: gr.Progress = gr.Progress()  # noqa: B008
                      ) -> tuple[str, str, list[tuple[str, str]], str]:
        """Draw `prompt`: (the image enlarged for display, the real image, the denoising
        trajectory as captioned frames ending with the result, stats); images as PNG paths
        (demo/files.py says why)."""
        def on_step(i: int, n: int) -> None:
            progress((i, n), desc="denoising")

        with _as_user_errors():
            out = self.pipe.text_to_image(prompt or "", steps=steps, guidance=guidance,
                                          shift=shift, seed=seed, trajectory=frames,
                                          on_step=on_step, height=height, width=width)
        image = out.images[0]
        big = self.display_size
        shown = upscale(image, big)
        strip = [(upscale(im, big), f"t = {t:.2f}")
                 for im, t in zip(out.trajectory[0] if out.trajectory else [], out.trajectory_t)]
        if not strip or strip[-1][0].tobytes() != shown.tobytes():  # (an Euler run's last
            strip.append((shown, "t = 0 (result)"))  # estimate is the result itself)
        log.info("text-to-image: %.2f s, nfe %d", out.seconds, out.nfe)
        self.files.prune()
        save = self.files.save
        return (save(shown, "cola-256px"), save(image, "cola"),
                [(save(im, "cola-step"), cap) for im, cap in strip],
                stats_line(out.seconds, out.nfe, f"{steps} steps, {image.width} x {image.height} px"))
