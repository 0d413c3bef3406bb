"""The Gradio demo: text-to-text, image-to-text and text-to-image with one Cola model.

    cola demo [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--share]

`build_app(pipe)` lays out three tabs over one shared `UnifiedPipeline` (handlers in
demo/handlers.py); `serve(...)` queues requests (bounded concurrency, bounded queue) and
starts the server. Named API endpoints, for `gradio_client.Client(url).predict(...)`:

    /generate_text(prompt, max_new_tokens, steps, guidance, shift, temperature, seed)
        -> (continuation, stats)                      streamed block by block
    /caption(image, question, prefix, max_new_tokens, steps, guidance, shift, temperature, seed,
             candidates)
        -> (caption, stats)
    /text_to_image(prompt, steps, guidance, shift, seed, frames, height, width)
        -> (image enlarged for display, real image, trajectory gallery, stats)

Bad input is refused with a readable `gr.Error` (a toast in the browser, an exception with
the message for an API client), never `{"error": null}` (demo/errors.py); the server keeps
serving. File parameters may only name the upload folder and the example folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from demo.components import ImageUpload, Knob, WholeNumber
from demo.errors import ReadableBlocks, exception_handlers
from demo.examples import DemoExamples, load_examples
from demo.handlers import Handlers
from tasks import image_to_text
from unified.apps.inputs import MAX_GENERATION_SCALE, MAX_IMAGE_SIDE
from unified.apps.pipeline import UnifiedPipeline
from unified.generate import GenerationConfig, ImageGenerationConfig
from unified.sampling import GenerationDefaults

CSS = """
.pixelated img { image-rendering: pixelated; }
#i2t-image img { width: 100%; height: 100%; object-fit: contain; }
"""


@dataclass(frozen=True)
class Limits:
    """Ranges of the demo's knobs (narrower than the pipeline's, to bound a request's cost)."""

    steps: int = 64
    guidance: float = 20.0
    shift: tuple[float, float] = (0.1, 10.0)
    temperature: float = 2.0
    frames: int = 16
    seed: int = 2**31 - 1
    max_new_tokens: int = 256
    candidates: int = 16


@dataclass(frozen=True)
class Defaults:
    """Starting values of the knobs; `Defaults.of` reads them from the model's saved
    generation defaults (what `build_app` uses), the class values are a new model's."""

    text_steps: int = GenerationConfig.steps
    text_guidance: float = GenerationConfig.guidance
    image_steps: int = ImageGenerationConfig.steps
    image_guidance: float = ImageGenerationConfig.guidance
    max_new_tokens: int = image_to_text.MAX_NEW_TOKENS
    frames: int = 8
    candidates: int = 1  # captions sampled and reranked (1 = plain)

    @classmethod
    def of(cls, g: GenerationDefaults) -> Defaults:
        return cls(text_steps=g.text.steps, text_guidance=g.text.guidance,
                   image_steps=g.image.steps, image_guidance=g.image.guidance,
                   max_new_tokens=g.caption.max_new_tokens)


def _knobs(prefix: str, limits: Limits, steps: int, guidance: float, temperature: bool,
           max_new_tokens: tuple[int, int] | None) -> list[gr.components.Component]:
    """The settings row of one tab, in the order of its handler's parameters (`temperature`
    and `max_new_tokens`: a text tab)."""
    text = temperature
    out = []
    if max_new_tokens:
        out.append(Knob(1, max_new_tokens[1], value=max_new_tokens[0], step=1, precision=0,
                        label="max new tokens", elem_id=f"{prefix}-max-new-tokens"))
    out += [Knob(1, limits.steps, value=steps, step=1, precision=0, label="steps",
                 info="ODE steps per block" if text else "ODE steps", elem_id=f"{prefix}-steps"),
            Knob(0, limits.guidance, value=guidance, step=0.5, label="guidance",
                 info="CFG scale, 1 = off", elem_id=f"{prefix}-guidance"),
            Knob(*limits.shift, value=1.0, step=0.1, label="shift",
                 info="> 1: more steps near noise", elem_id=f"{prefix}-shift")]
    if temperature:
        out.append(Knob(0, limits.temperature, value=0.0, step=0.05, label="temperature",
                        info="0 = greedy",
                        elem_id=f"{prefix}-temperature"))
    out.append(WholeNumber(value=0, minimum=0, maximum=limits.seed, precision=0, label="seed",
                           elem_id=f"{prefix}-seed"))
    return out


def _examples(rows: list[list], components: list, label: str, run=None) -> None:
    """Examples that fill `components` and, with `run` = (fn, inputs, outputs), then run the
    task with the current settings: one click shows a result."""
    ex = gr.Examples(rows, components, label=label)
    if run is not None:
        fn, inputs, outputs = run
        ex.load_input_event.then(fn, inputs, outputs, api_visibility="private")


def _stats(prefix: str) -> gr.Textbox:
    return gr.Textbox(label="latency and nfe", interactive=False,
                      elem_id=f"{prefix}-stats")


def _text_tab(h: Handlers, ex: DemoExamples, limits: Limits, d: Defaults, budget: int) -> None:
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(value=ex.text_prompts[0], label="prompt", lines=3,
                                elem_id="t2t-prompt")
            run = gr.Button("Continue", variant="primary", elem_id="t2t-run")
        with gr.Column():
            out = gr.Textbox(label="continuation", lines=6,
                             interactive=False, elem_id="t2t-output")
            stats = _stats("t2t")
    with gr.Accordion("settings", open=True):
        with gr.Row():
            knobs = _knobs("t2t", limits, d.text_steps, d.text_guidance, True,
                           (min(d.max_new_tokens, budget), budget))
    inputs = [prompt, *knobs]
    run.click(h.generate_text, inputs, [out, stats], api_name="generate_text")
    prompt.submit(h.generate_text, inputs, [out, stats], api_visibility="private")
    _examples([[p] for p in ex.text_prompts], [prompt], "prompts (click one to run it)",
              (h.generate_text, inputs, [out, stats]))


def _caption_tab(h: Handlers, ex: DemoExamples, limits: Limits, d: Defaults, budget: int,
                 enabled: bool) -> None:
    first = ex.images[0]
    with gr.Row():
        with gr.Column():
            image = ImageUpload(value=str(first.path), type="filepath", image_mode=None,
                                format="png", label="image", height=256,
                                interactive=enabled, elem_id="i2t-image",
                                elem_classes=["pixelated"])
            question = gr.Textbox(label="question (optional)", value=first.question,
                                  placeholder="e.g. what color is the object at the top left?",
                                  elem_id="i2t-question", interactive=enabled)
            prefix = gr.Textbox(label="caption prefix (optional)", value=first.prefix,
                                placeholder="e.g. two objects: a small", elem_id="i2t-prefix",
                                interactive=enabled)
            run = gr.Button("Describe", variant="primary", elem_id="i2t-run", interactive=enabled)
        with gr.Column():
            out = gr.Textbox(label="caption", lines=3, interactive=False,
                             elem_id="i2t-output")
            stats = _stats("i2t")
    with gr.Accordion("settings", open=True):
        with gr.Row():
            knobs = _knobs("i2t", limits, d.text_steps, d.text_guidance, True,
                           (min(d.max_new_tokens, budget), budget))
            candidates = Knob(1, limits.candidates, value=d.candidates, step=1, precision=0,
                              label="candidates", info="answers sampled; the one the model best "
                              "explains is kept (1 = plain sampling)",
                              elem_id="i2t-candidates")
    inputs = [image, question, prefix, *knobs, candidates]
    run.click(h.caption, inputs, [out, stats], api_name="caption")
    _examples([[str(e.path), e.question, e.prefix] for e in ex.images], [image, question, prefix],
              "shapes-world images (click one to run it)",
              (h.caption, inputs, [out, stats]) if enabled else None)


def _size_knobs(pipe: UnifiedPipeline) -> list[gr.components.Component]:
    """Height and width in pixels: the model's training size to start, multiples of one image
    token (checked by the pipeline, unified/apps/inputs.py image_size), non-square allowed."""
    m = pipe.model
    f, size = m.image_factor, m.image_size
    hi = min(MAX_IMAGE_SIDE, MAX_GENERATION_SCALE * size) // f * f
    return [WholeNumber(value=size, minimum=f, maximum=hi, step=f, precision=0, label=name,
                        info=f"pixels, a multiple of {f}", elem_id=f"t2i-{name}")
            for name in ("height", "width")]


def _image_tab(h: Handlers, ex: DemoExamples, limits: Limits, d: Defaults, enabled: bool) -> None:
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(value=ex.image_prompts[0], label="prompt", lines=2,
                                elem_id="t2i-prompt", interactive=enabled)
            run = gr.Button("Draw", variant="primary", elem_id="t2i-run", interactive=enabled)
            stats = _stats("t2i")
            real = gr.Image(label="real image", type="filepath", format="png",
                            height=96, interactive=False, buttons=["download"],
                            elem_id="t2i-real", elem_classes=["pixelated"])
        with gr.Column():
            shown = gr.Image(label="image", type="filepath", format="png",
                             interactive=False, elem_id="t2i-image")
    gr.Markdown("**Denoising trajectory**: the model's estimate of the image at each recorded "
                "step, from t = 1 (pure noise) to t = 0. The image above is enlarged 8x "
                "(nearest neighbour); *real image* is the 32 x 32 output, to download.")
    strip = gr.Gallery(label="trajectory", columns=9, rows=1, height=180, format="png",
                       elem_id="t2i-trajectory")
    with gr.Accordion("settings", open=True):
        with gr.Row():
            knobs = _knobs("t2i", limits, d.image_steps, d.image_guidance, False, None)
            frames = Knob(0, limits.frames, value=d.frames, step=1, precision=0,
                          label="trajectory frames", elem_id="t2i-frames")
            sizes = _size_knobs(h.pipe) if enabled else []
    inputs = [prompt, *knobs, frames, *sizes]
    run.click(h.text_to_image, inputs, [shown, real, strip, stats], api_name="text_to_image")
    _examples([[p] for p in ex.image_prompts], [prompt],
              "captions from the shapes world (click one to run it)",
              (h.text_to_image, inputs, [shown, real, strip, stats]) if enabled else None)


def build_app(pipe: UnifiedPipeline, examples: DemoExamples | None = None, *,
              title: str = "demo/checkpoint", limits: Limits = Limits(),
              defaults: Defaults | None = None) -> gr.Blocks:
    """The demo's Blocks over one shared pipeline (not yet queued or launched); the knobs
    start at `defaults`, by default the model's own (`UnifiedPipeline.defaults`)."""
    defaults = defaults or Defaults.of(pipe.defaults)
    ex = examples or load_examples()
    h = Handlers(pipe)
    sees = pipe.can_see_images
    budget = max(1, min(limits.max_new_tokens, pipe.model.vae.config.max_len - 16))
    with ReadableBlocks(title="Cola demo", delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            "# Cola: one continuous-latent prior for text and images\n"
            f"Model `{title}` · " + ("text-to-text, image-to-text and text-to-image"
                                     if sees else "**text only**") +
            " · each result shows its latency and the number of model evaluations (nfe).")
        no_images = ("**This checkpoint is text-only: it has no image side.** Start the demo with "
                     "a unified checkpoint (`cola demo --checkpoint DIR`) for this tab.")
        with gr.Tabs():
            with gr.Tab("Text → text", id="t2t"):
                _text_tab(h, ex, limits, defaults, budget)
            with gr.Tab("Image → text", id="i2t"):
                if not sees:
                    gr.Markdown(no_images, elem_id="i2t-unavailable")
                _caption_tab(h, ex, limits, defaults, budget, sees)
            with gr.Tab("Text → image", id="t2i"):
                if not sees:
                    gr.Markdown(no_images, elem_id="t2i-unavailable")
                _image_tab(h, ex, limits, defaults, sees)
    return app


def serve(pipe: UnifiedPipeline, *, host: str = "127.0.0.1", port: int = 7860,
          share: bool = False, concurrency: int = 2, max_queue: int = 64,
          title: str = "demo/checkpoint", examples_dir: str | Path | None = None) -> None:
    """Build, queue and launch the demo; blocks until the server stops."""
    ex = load_examples(examples_dir) if examples_dir else load_examples()
    app = build_app(pipe, ex, title=title)
    app.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    app.launch(server_name=host, server_port=port, share=share, ssr_mode=False, css=CSS,
               allowed_paths=[str(ex.images[0].path.parent)], max_file_size="20mb",
               show_error=False, app_kwargs={"exception_handlers": exception_handlers()})
