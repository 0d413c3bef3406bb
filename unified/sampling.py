"""The knobs of generation and their defaults (DESIGN §3 "Generation").

`GenerationConfig` (text-to-text and image-to-text) and `ImageGenerationConfig` (text-to-image)
check their values with clear messages. `GenerationDefaults` is the set a model carries:
saved in its model_index.json ("generation") and read back by `ColaModel.from_pretrained`, so
the command line, the pipeline, the demo and the server start from the model's own defaults
(`register_to_config` style), not from constants of their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from prior.flow import SamplerConfig, check_int, check_real

MAX_SEED = 2**63 - 2  # the token generator is seeded with seed + 1


def _check_sampler(steps, method, shift, guidance) -> SamplerConfig:
    return SamplerConfig(steps, method, shift, guidance)  # validates with clear messages


@dataclass(frozen=True)
class GenerationConfig:
    """Knobs of text generation (text-to-text and image-to-text)."""

    max_new_tokens: int = 64
    steps: int = 8
    guidance: float = 2.0
    shift: float = 1.0
    method: str = "euler"
    temperature: float = 0.0  # token sampling in the decoder; 0 = greedy (the flow samples)
    # the flow's temperature: the std of the noise each text block starts from. Below 1 the
    # ODE starts nearer the centre of the prior and lands nearer its modes, so the history
    # (the prompt) decides more of the text and the seed less (docs/diagnostics.md)
    noise_scale: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    # never emit EOS (the decoder's EOS logit masked): exactly max_new_tokens, as the AR's
    # min_new_tokens does for fixed-length benchmarks (bench/genppl.py --ignore-eos)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # a frozen dataclass
        set_("max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, 1, 1 << 20))
        check_real("temperature", self.temperature, 0.0, 10.0)
        check_real("noise_scale", self.noise_scale, 0.0, 10.0)
        set_("top_k", check_int("top_k", self.top_k, 0, 1 << 30))
        check_real("top_p", self.top_p, 0.0, 1.0, low_open=True)
        set_("seed", check_int("seed", self.seed, 0, MAX_SEED))
        set_("steps", self.sampler.steps)

    @property
    def sampler(self) -> SamplerConfig:
        return _check_sampler(self.steps, self.method, self.shift, self.guidance)


@dataclass(frozen=True)
class ImageGenerationConfig:
    """Knobs of text-to-image generation."""

    steps: int = 16
    guidance: float = 4.0
    shift: float = 1.0
    method: str = "euler"
    seed: int = 0
    # the image's size in pixels (None: the model's training size); a call's choice, like the
    # seed, not a saved default. unified/apps/inputs.py `image_size` checks them against a model
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", check_int("seed", self.seed, 0, MAX_SEED))
        object.__setattr__(self, "steps", self.sampler.steps)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(name, getattr(self, name), 1, 1 << 16))

    @property
    def sampler(self) -> SamplerConfig:
        return _check_sampler(self.steps, self.method, self.shift, self.guidance)


PER_CALL = ("seed", "height", "width", "ignore_eos")  # knobs of one call, never saved

CAPTION_TOKENS = 48  # a caption or an answer: a shapes caption fits


@dataclass(frozen=True)
class GenerationDefaults:
    """The generation defaults a model is saved with: text continuation, captions and
    answers, images. Seeds are per call (0 when not given), not part of a model, and so is an
    image's size (the model's training size when not given)."""

    text: GenerationConfig = field(default_factory=GenerationConfig)
    caption: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=CAPTION_TOKENS))
    image: ImageGenerationConfig = field(default_factory=ImageGenerationConfig)

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {k: {n: v for n, v in dataclasses.asdict(getattr(self, k)).items()
                    if n not in PER_CALL}
                for k in ("text", "caption", "image")}

    @classmethod
    def from_json(cls, values: dict[str, Any] | None) -> GenerationDefaults:
        """From model_index.json's "generation" (missing parts keep the class defaults);
        ValueError naming the part for an unknown knob or a bad value."""
        values = values or {}
        if not isinstance(values, dict):
            raise ValueError(f"generation must be a table of text / caption / image, got "
                             f"{values!r}")
        base = cls()
        parts = {}
        for name in ("text", "caption", "image"):
            given = values.get(name) or {}
            klass = type(getattr(base, name))
            known = {f.name for f in dataclasses.fields(klass)} - set(PER_CALL)
            unknown = set(given) - known
            if unknown:
                raise ValueError(f"generation.{name}: unknown knobs {sorted(unknown)}")
            try:
                parts[name] = dataclasses.replace(getattr(base, name), **given)
            except (TypeError, ValueError) as e:
                raise ValueError(f"generation.{name}: {e}") from None
        return cls(**parts)

    def fill(self, task: str, **given: Any) -> dict[str, Any]:
        """`given` knobs with each None replaced by this model's default for `task`."""
        defaults = getattr(self, task)
        return {k: getattr(defaults, k) if v is None else v for k, v in given.items()}
