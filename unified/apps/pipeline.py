"""`UnifiedPipeline`: the one-line entry point to a trained model, in the diffusers style.

    pipe = UnifiedPipeline.from_pretrained("demo/checkpoint")
    pipe.generate_text("Return the number of").text
    pipe.caption(Image.open("scene.png")).text
    pipe.text_to_image("a large red circle at the top left").images[0].save("out.png")
    pipe.save_pretrained("my-model")

It is a diffusers `DiffusionPipeline` whose components (text_vae, prior, image_vae, tokenizer)
are the parts of a ColaModel (unified/model.py), which reads and writes the folder. Every call
keeps its state (noise generators, KV caches) to itself, so one pipeline can serve concurrent
requests. Bad arguments raise ValueError with a message meant for the user.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from tasks import image_to_text, text_to_image, text_to_text
from unified.apps import inputs
from unified.apps.inputs import MAX_IMAGE_SIDE, MAX_PROMPT_CHARS, open_image
from unified.data.images import model_input, to_rgb
from unified.generate import BlockOutput, GenerationConfig, ImageGenerationConfig
from unified.layout import TextLayoutConfig, TimeConfig
from unified.model import ColaModel, default_device
from unified.sampling import GenerationDefaults

__all__ = ["MAX_IMAGE_SIDE", "MAX_PROMPT_CHARS", "ImageResult", "TextResult", "UnifiedPipeline",
           "check_prompt", "open_image", "prepare_image", "to_pil"]



@dataclass
class TextResult:
    texts: list[str]
    nfe: int  # prior forward calls (one fused CFG call counts once)
    seconds: float

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass
class ImageResult:
    images: list[Image.Image]
    nfe: int
    seconds: float
    trajectory: list[list[Image.Image]] = field(default_factory=list)  # per image, t = 1 -> 0
    trajectory_t: list[float] = field(default_factory=list)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
    return [Image.fromarray(a.cpu().numpy(), mode="RGB") for a in arr]


def prepare_image(image, size: int) -> torch.Tensor:
    """A PIL image, an array (HWC uint8 / uint16, or float in [0, 1]; 3 or 4 channels) or a
    path -> [3, size, size] in [-1, 1], preprocessed exactly as training images are
    (unified.data.images: EXIF orientation, alpha onto white, 16-bit scaled, shorter side resized
    to `size`, center crop). Raises ValueError for anything that is not a readable,
    reasonably sized image."""
    if isinstance(image, (str, Path)):
        image = open_image(image, size)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"an image array must be H x W x 3 (or 4), got shape {image.shape}")
        inputs.check_image_size(image.shape[1], image.shape[0])
        if not np.isfinite(image).all():
            raise ValueError("the image holds NaN or infinite values")
        arr = image.astype(np.float64)
        if image.dtype.kind == "f" and arr.max() <= 1.0:
            arr = arr * 255
        elif image.dtype.kind in "ui" and image.dtype.itemsize > 1 and arr.max() > 255:
            arr = arr * (255.0 / 65535.0)  # 16-bit
        image = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected an image, got {type(image).__name__}")
    inputs.check_image_size(*image.size)  # before the pixels of a lazily opened image load
    try:
        rgb = to_rgb(image)
    except Exception as e:  # noqa: BLE001 - e.g. a truncated file opened by the caller
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    return model_input(rgb, size)


def check_prompt(prompt: str, what: str = "prompt", allow_empty: bool = False) -> str:
    """A prompt, question or prefix checked by unified.apps.inputs.text."""
    return inputs.text(what, prompt, allow_empty=allow_empty)


def row_seeds(seed: int | list[int], rows: int) -> tuple[int, list[int]]:
    """`seed` (one for every row) or a list of one seed per row -> (the first, the list). A
    row's output depends on its own prompt and seed only, never on the rest of the batch."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * rows
    seeds = [inputs.KNOBS["seed"].check("seed", s) for s in seeds]
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} prompts: give one seed, or one per prompt")
    if not seeds:
        raise ValueError("no prompts given")
    return seeds[0], seeds


class UnifiedPipeline(DiffusionPipeline):
    """Text-to-text, image-to-text and text-to-image with one Cola prior."""

    _optional_components = ["prior", "image_vae"]

    def __init__(self, text_vae, tokenizer, prior=None, image_vae=None, block_size: int = 16,
                 image_patch_size: int = 2, image_size: int = 32,
                 image_time: tuple[float, float] = (1.0, 1.0), generation: dict | None = None):
        super().__init__()
        self.register_modules(text_vae=text_vae, tokenizer=tokenizer, prior=prior,
                              image_vae=image_vae)
        defaults = GenerationDefaults.from_json(generation)
        self.register_to_config(block_size=block_size, image_patch_size=image_patch_size,
                                image_size=image_size, image_time=list(image_time),
                                generation=defaults.to_json())
        self.model = ColaModel(text_vae, prior, tokenizer, TextLayoutConfig(block_size=block_size),
                               image_vae, image_patch_size, TimeConfig(*image_time), image_size)
        self.model.generation = defaults

    # ----------------------------------------------------------------- folders
    @classmethod
    def from_model(cls, model: ColaModel) -> UnifiedPipeline:
        t = model.image_time
        pipe = cls(model.vae, model.tokenizer, model.prior, model.image_vae, model.block_size,
                   model.image_patch_size, model.image_size, (t.loc, t.scale),
                   model.generation.to_json())
        pipe.model.image_vae_source = model.image_vae_source
        return pipe

    @property
    def defaults(self) -> GenerationDefaults:
        """The knob defaults this model was saved with (model_index.json "generation"): every
        knob a call leaves as None takes its value from here."""
        return self.model.generation

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        **_ignored) -> UnifiedPipeline:
        """Load a model folder (`cola export`, `cola train` .../final, `save_pretrained`)."""
        return cls.from_model(ColaModel.from_pretrained(folder, device=device or default_device()))

    def save_pretrained(self, folder: str | Path, **_ignored) -> None:
        self.model.save_pretrained(folder)

    @property
    def can_see_images(self) -> bool:
        return self.image_vae is not None and self.prior is not None and \
            "image" in self.prior.modality_names

    def _need_images(self) -> None:
        if not self.can_see_images:
            raise ValueError("this model has no image side (a text-only checkpoint)")

    # ----------------------------------------------------------------- tasks
    def generate_text(self, prompt: str | list[str], *, max_new_tokens: int | None = None,
                      steps: int | None = None, guidance: float | None = None,
                      shift: float | None = None, temperature: float | None = None,
                      top_k: int | None = None, top_p: float | None = None,
                      seed: int | list[int] = 0, method: str | None = None,
                      noise_scale: float | None = None, stream: bool = False
                      ) -> TextResult | Iterator[BlockOutput]:
        """Continue a prompt (or a list of prompts) block by block; `stream=True` yields a
        BlockOutput per block instead of the final TextResult. `seed`: one for every prompt,
        or a list of one per prompt. A knob left as None takes the model's default
        (`self.defaults.text`)."""
        prompts = inputs.texts("prompt", prompt)
        seed, seeds = row_seeds(seed, len(prompts))
        gen = GenerationConfig(**inputs.knobs(seed=seed, **self.defaults.fill(
            "text", max_new_tokens=max_new_tokens, steps=steps, guidance=guidance, shift=shift,
            temperature=temperature, top_k=top_k, top_p=top_p, method=method,
            noise_scale=noise_scale)))
        it = text_to_text.stream(self.model, prompts, gen, seeds=seeds)
        return it if stream else _finish_text(it)

    def caption(self, image, *, question: str | None = None, prefix: str = "",
                max_new_tokens: int | None = None, steps: int | None = None,
                guidance: float | None = None, shift: float | None = None,
                temperature: float | None = None, seed: int = 0, method: str | None = None,
                noise_scale: float | None = None, rerank: int = 0, stream: bool = False
                ) -> TextResult | Iterator[BlockOutput]:
        """Describe an image (or answer `question` about it), optionally continuing `prefix`.
        `image`: a PIL image, an H x W x 3 array, a path, or a list of those. `rerank` = K > 1
        samples K answers (seeds seed .. seed+K-1) and keeps one (tasks.image_to_text.answer):
        a caption that the same prior's text-to-image direction explains best, an answer to a
        question that the prior explains best given the image and the question; it costs
        about K times the prior calls and cannot stream."""
        self._need_images()
        images = image if isinstance(image, list) else [image]
        inputs.batch("images", len(images))
        q = check_prompt(question or "", "question", allow_empty=True).strip() or None
        prefix = check_prompt(prefix, "caption prefix", allow_empty=True)
        knobs = inputs.knobs(seed=seed, rerank=rerank, **self.defaults.fill(
            "caption", max_new_tokens=max_new_tokens, steps=steps, guidance=guidance,
            shift=shift, temperature=temperature, method=method, noise_scale=noise_scale))
        rerank = knobs.pop("rerank")
        gen = GenerationConfig(**knobs)
        x = torch.stack([prepare_image(im, self.model.image_size) for im in images])
        x, qs, prefixes = x.to(self.model.vae.device), [q] * len(images), [prefix] * len(images)
        if rerank > 1:
            if stream:
                raise ValueError("a reranked caption cannot stream: it is chosen among finished "
                                 "samples")
            t0 = time.perf_counter()
            out = image_to_text.answer(self.model, x, qs, prefixes, gen, rerank=rerank)
            return TextResult(out.texts, out.nfe, time.perf_counter() - t0)
        it = image_to_text.stream(self.model, x, qs, prefixes, gen)
        return it if stream else _finish_text(it, prefix)

    def image_size(self, height=None, width=None, names: tuple[str, str] = ("height", "width")
                   ) -> tuple[int, int]:
        """(height, width) in pixels of an image this model draws (None: its training size),
        checked by unified/apps/inputs.py `image_size` (multiples of one token, bounded); a
        message names the field as `names` says."""
        self._need_images()
        m = self.model
        return inputs.image_size(height, width, factor=m.image_factor, size=m.image_size,
                                 names=names)

    def text_to_image(self, prompt: str | list[str], *, steps: int | None = None,
                      guidance: float | None = None, shift: float | None = None,
                      seed: int | list[int] = 0, method: str | None = None,
                      trajectory: int = 0, on_step=None, height: int | None = None,
                      width: int | None = None) -> ImageResult:
        """Draw an image for a prompt (or one per prompt of a list; `seed`: one for every
        prompt, or one per prompt). `trajectory` > 0 also returns that many intermediate
        decodes of the data estimate, noise to image. `height` / `width` in pixels (None: the
        model's training size; multiples of `model.image_factor`, non-square allowed). A knob
        left as None takes the model's default (`self.defaults.image`)."""
        self._need_images()
        prompts = inputs.texts("prompt", prompt)
        seed, seeds = row_seeds(seed, len(prompts))
        knobs = inputs.knobs(seed=seed, trajectory=trajectory, **self.defaults.fill(
            "image", steps=steps, guidance=guidance, shift=shift, method=method))
        trajectory = knobs.pop("trajectory")
        if height is not None or width is not None:
            knobs["height"], knobs["width"] = self.image_size(height, width)
        gen = ImageGenerationConfig(**knobs)
        t0 = time.perf_counter()
        out = text_to_image.generate(self.model, prompts, gen, trajectory=trajectory,
                                     on_step=on_step, seeds=seeds)
        traj = [to_pil(step) for step in out.trajectory]  # [steps][B]
        per_image = [[step[b] for step in traj] for b in range(len(prompts))] if traj else []
        return ImageResult(to_pil(out.images), out.nfe, time.perf_counter() - t0, per_image,
                           out.trajectory_t)


def _finish_text(it: Iterator[BlockOutput], prefix: str = "") -> TextResult:
    t0 = time.perf_counter()
    *_, last = it
    return TextResult([prefix + t for t in last.texts], last.nfe, time.perf_counter() - t0)
