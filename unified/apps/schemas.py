"""The server's request bodies (OpenAI schemas plus the project's knobs) and their checks: one
function per request type turns a body into a batcher Job or raises ApiError with a message
naming the field. The limits and messages of the pipeline (unified/apps/pipeline.py: check_prompt,
prepare_image, the image size limit) and of the generation configs apply unchanged."""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel, ConfigDict

from prior.flow import SAMPLERS
from unified.apps import inputs
from unified.apps.batcher import Job
from unified.apps.errors import ApiError
from unified.apps.pipeline import MAX_IMAGE_SIDE, check_prompt, prepare_image
from unified.generate import MAX_SEED, GenerationConfig, ImageGenerationConfig

MAX_N = 16  # choices (or images) per request
MAX_STEPS = 64  # ODE steps a request may ask for (per block for text)
MAX_SEED_DRAWN = 2**31 - 1  # a request without a seed gets a random one below this


@dataclass
class ServeContext:
    """What the checks need to know about the served model."""

    pipe: object  # UnifiedPipeline
    model_id: str
    timeout: float = 300.0

    @property
    def context(self) -> int:
        return self.pipe.model.vae.config.max_len

    @property
    def image_size(self) -> int:
        return self.pipe.model.image_size


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int | None = None
    seed: int | None = None
    steps: int | None = None  # the project's knobs, sent as extra fields
    guidance: float | None = None
    shift: float | None = None
    sampler: str | None = None


class _TextBody(_Body):
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    noise_scale: float | None = None  # the flow's temperature (GenerationConfig.noise_scale)
    stream: bool | None = False
    stream_options: dict | None = None


class CompletionRequest(_TextBody):
    prompt: str | list[str]


class ChatRequest(_TextBody):
    messages: list[dict]
    max_completion_tokens: int | None = None


class ImageRequest(_Body):
    prompt: str
    size: str | None = None
    response_format: str | None = None


# fields of the OpenAI schemas this server does not implement: refused unless at their default
_UNSUPPORTED = {"stop": (None, [], ""), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
                "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
                "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty":
                (None, 0), "tools": (None, []), "functions": (None, []),
                "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"})}


@contextmanager
def as_param(param: str) -> Iterator[None]:
    """A ValueError raised inside becomes a 400 naming `param`."""
    try:
        yield
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None


def _check_common(body: _Body, ctx: ServeContext, unsupported: tuple[str, ...]) -> None:
    if body.model is not None and body.model != ctx.model_id:
        raise ApiError(404, f"the model {body.model!r} does not exist: this server serves "
                            f"{ctx.model_id!r} (GET /v1/models)", param="model",
                       code="model_not_found")
    extra = body.model_extra or {}
    for name in unsupported:
        value = extra.get(name, None)
        if value not in _UNSUPPORTED[name]:
            raise ApiError(400, f"{name} is not supported by this server", param=name,
                           code="unsupported_parameter")


def _seeds(body: _Body, rows: int) -> list[int]:
    n = 1 if body.n is None else body.n
    with as_param("n"):
        inputs.whole("n", n, 1, MAX_N)
    seed = secrets.randbelow(MAX_SEED_DRAWN) if body.seed is None else body.seed
    with as_param("seed"):
        inputs.whole("seed", seed, 0, MAX_SEED - n)
    return [seed + j for _ in range(rows) for j in range(n)]  # prompt-major: choice r*n + j


def _sampler(body: _Body, d) -> dict:
    """The request's sampler knobs; those it leaves out are the model's defaults `d`."""
    out = dict(steps=d.steps if body.steps is None else body.steps,
               guidance=d.guidance if body.guidance is None else body.guidance,
               shift=d.shift if body.shift is None else body.shift,
               method=body.sampler or d.method)
    with as_param("steps"):
        inputs.whole("steps", out["steps"], 1, MAX_STEPS)
    with as_param("guidance"):
        inputs.real("guidance", out["guidance"], 0.0, 20.0)
    with as_param("shift"):
        inputs.real("shift", out["shift"], 0.0, 10.0, low_open=True)
    if out["method"] not in SAMPLERS:
        raise ApiError(400, f"unknown sampler {out['method']!r}; choose one of {SAMPLERS}",
                       param="sampler")
    return out


def _text_tokens(ctx: ServeContext, text: str) -> int:
    """Tokens of a text row as the engine counts them: [bos] + the text's tokens."""
    tok = ctx.pipe.model.tokenizer
    body = tok.encode(text, add_special_tokens=False, split_special_tokens=True) \
        if text.strip() else []
    return 1 + len(body)


def _text_gen(body: _TextBody, ctx: ServeContext, prompt_tokens: int, task: str,
              seed: int, param: str, budget: int | None) -> GenerationConfig:
    """The knobs of a text request; those it leaves out are the model's saved defaults for
    `task` ("text" or "caption": `UnifiedPipeline.defaults`)."""
    d = getattr(ctx.pipe.defaults, task)
    default_budget = d.max_new_tokens
    room = ctx.context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt is too long: {prompt_tokens} tokens leave no room in "
                            f"the model's context of {ctx.context} tokens", param=param,
                       code="context_length_exceeded")
    budget = min(default_budget, room) if budget is None else budget
    with as_param("max_tokens"):
        budget = inputs.whole("max_tokens", budget, 1, 1 << 20)
    if budget > room:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens and max_tokens {budget}: "
                            f"together at most the model's context of {ctx.context} tokens "
                            f"(lower max_tokens)", param="max_tokens",
                       code="context_length_exceeded")
    temperature = d.temperature if body.temperature is None else body.temperature
    with as_param("temperature"):
        inputs.real("temperature", temperature, 0.0, 2.0)
    top_p = d.top_p if body.top_p is None else body.top_p
    with as_param("top_p"):
        inputs.real("top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = d.top_k if body.top_k is None else body.top_k
    with as_param("top_k"):
        inputs.whole("top_k", top_k, 0, 1 << 20)
    noise_scale = d.noise_scale if body.noise_scale is None else body.noise_scale
    with as_param("noise_scale"):
        inputs.real("noise_scale", noise_scale, 0.0, 10.0)
    knobs = _sampler(body, d)
    with as_param(param):
        return GenerationConfig(max_new_tokens=budget, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, noise_scale=noise_scale, **knobs)


def completion_job(body: CompletionRequest, ctx: ServeContext) -> Job:
    """POST /v1/completions: each prompt continued `n` times (seeds seed .. seed + n - 1)."""
    _check_common(body, ctx, ("stop", "logprobs", "echo", "suffix", "best_of", "logit_bias",
                              "presence_penalty", "frequency_penalty"))
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) > MAX_N:
        raise ApiError(400, f"give 1 to {MAX_N} prompts, got {len(prompts)}", param="prompt")
    for i, p in enumerate(prompts):
        with as_param("prompt" if len(prompts) == 1 else f"prompt[{i}]"):
            check_prompt(p)
    seeds = _seeds(body, len(prompts))
    n = len(seeds) // len(prompts)
    tokens = [_text_tokens(ctx, p) for p in prompts]
    gen = _text_gen(body, ctx, max(tokens), "text", seeds[0], "prompt", body.max_tokens)
    return Job("text", gen, [p for p in prompts for _ in range(n)], seeds,
               prompt_tokens=max(tokens), prompt_usage=sum(tokens) * n, timeout=ctx.timeout)


def _parts(msg: dict, i: int) -> list[tuple[str, object, str]]:
    """A message's content as (kind, value, param) parts: ("text", str) or ("image", url)."""
    if not isinstance(msg, dict):
        raise ApiError(400, "each message must be an object with a role and a content",
                       param=f"messages[{i}]")
    role = msg.get("role")
    if role not in ("system", "developer", "user", "assistant"):
        raise ApiError(400, f"unsupported role {role!r}: use system, user or assistant",
                       param=f"messages[{i}].role")
    content = msg.get("content")
    if content is None or isinstance(content, str):
        return [("text", content or "", f"messages[{i}].content")]
    if not isinstance(content, list):
        raise ApiError(400, "content must be text or a list of parts",
                       param=f"messages[{i}].content")
    out = []
    for j, part in enumerate(content):
        param = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(("text", part["text"], param))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(400, "an image_url part needs {\"url\": \"data:image/png;base64,"
                                    "...\"}", param=param)
            if role != "user":
                raise ApiError(400, "images are accepted in user messages only", param=param)
            out.append(("image", url, param))
        else:
            raise ApiError(400, f"unsupported content part {kind!r}: use text or image_url",
                           param=param)
    return out


_DATA_URL = re.compile(r"data:image/(png|jpeg|jpg);base64,(.*)", re.S | re.I)


def decode_image(url: str, param: str) -> Image.Image:
    """A data: URL of a PNG or JPEG -> a PIL image. Nothing is ever fetched."""
    if re.match(r"(https?|ftp|file)://", url, re.I):
        raise ApiError(400, "image URLs are not fetched (the server makes no network requests): "
                            "send the image inline as data:image/png;base64,...", param=param,
                       code="image_url_not_supported")
    m = _DATA_URL.match(url)
    if not m:
        raise ApiError(400, "an image must be a data URL of a PNG or JPEG file "
                            "(data:image/png;base64,... or data:image/jpeg;base64,...)",
                       param=param)
    try:
        raw = base64.b64decode("".join(m[2].split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image data is not valid base64", param=param) from None
    try:
        with warnings.catch_warnings():  # the size check below refuses huge images anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001 - any decoding failure is the user's data
        raise ApiError(400, f"not a readable image ({type(e).__name__})", param=param) from None
    if image.format not in ("PNG", "JPEG"):
        raise ApiError(400, f"only PNG and JPEG images are accepted, got {image.format}",
                       param=param)
    w, h = image.size
    if max(w, h) > MAX_IMAGE_SIDE:
        raise ApiError(413, f"the image is too large ({w} x {h}); at most {MAX_IMAGE_SIDE} "
                            f"pixels a side", param=param)
    try:
        image.load()
    except Exception as e:  # noqa: BLE001 - e.g. a truncated file
        raise ApiError(400, f"not a readable image ({type(e).__name__}: {e})", param=param) \
            from None
    return image


def chat_job(body: ChatRequest, ctx: ServeContext) -> Job:
    """POST /v1/chat/completions. With an image (one, in a user message): captioning; the text
    of that message is the question if it ends with "?", else the start of the caption to
    continue (empty: describe the image). Without: the messages' texts, one per line, are
    continued (the model is a plain language model: no chat template)."""
    _check_common(body, ctx, ("stop", "logprobs", "top_logprobs", "logit_bias",
                              "presence_penalty", "frequency_penalty", "tools", "functions",
                              "tool_choice", "response_format"))
    if not body.messages:
        raise ApiError(400, "messages is empty", param="messages")
    parts = [(i, p) for i, m in enumerate(body.messages) for p in _parts(m, i)]
    images = [(i, p) for i, p in parts if p[0] == "image"]
    budget = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if not images:
        prompt = "\n".join(v for _, (_, v, _) in parts if v)
        with as_param("messages"):
            check_prompt(prompt, "conversation")
        seeds = _seeds(body, 1)
        tokens = _text_tokens(ctx, prompt)
        gen = _text_gen(body, ctx, tokens, "text", seeds[0], "messages", budget)
        return Job("text", gen, [prompt] * len(seeds), seeds, prompt_tokens=tokens,
                   prompt_usage=tokens, timeout=ctx.timeout)
    if len(images) > 1:
        raise ApiError(400, "send one image per request", param=images[1][1][2])
    if not ctx.pipe.can_see_images:
        raise ApiError(400, "this model has no image side (a text-only checkpoint)",
                       param=images[0][1][2])
    at, (_, url, param) = images[0]
    text = " ".join(v for i, (k, v, _) in parts if i == at and k == "text")
    question = text.strip() if text.strip().endswith("?") else None
    prefix = "" if question or not text.strip() else text
    with as_param(f"messages[{at}].content"):
        check_prompt(question or "", "question", allow_empty=True)
        check_prompt(prefix, "caption prefix", allow_empty=True)
    with as_param(param):
        x = prepare_image(decode_image(url, param), ctx.image_size)
    seeds = _seeds(body, 1)
    tokens = _text_tokens(ctx, prefix)
    gen = _text_gen(body, ctx, tokens, "caption", seeds[0], f"messages[{at}].content",
                    budget)
    image_tokens = ctx.pipe.model.image_grid().shape[0]
    usage = tokens + image_tokens + (_text_tokens(ctx, question) if question else 0)
    n = len(seeds)
    return Job("caption", gen, [prefix] * n, seeds, images=x[None].repeat(n, 1, 1, 1),
               questions=[question] * n, prompt_tokens=tokens, prompt_usage=usage,
               timeout=ctx.timeout)


def image_job(body: ImageRequest, ctx: ServeContext) -> Job:
    """POST /v1/images/generations: `n` images of the prompt (seeds seed .. seed + n - 1)."""
    _check_common(body, ctx, ())
    if not ctx.pipe.can_see_images:
        raise ApiError(400, "this model has no image side (a text-only checkpoint): it cannot "
                            "draw images")
    height = width = None  # None, "auto": the model's training size
    try:  # "WIDTHxHEIGHT", checked by unified/apps/inputs.py image_size
        given = inputs.size_text("size", body.size)
        if given is not None:
            height, width = ctx.pipe.image_size(*given, names=("size height", "size width"))
    except ValueError as e:
        s = ctx.image_size
        raise ApiError(400, f"{e} (this model's own size is {s}x{s})", param="size") from None
    if body.response_format not in (None, "b64_json"):
        raise ApiError(400, f"response_format {body.response_format!r} is not served: images "
                            f"are returned inline, use b64_json", param="response_format")
    with as_param("prompt"):
        check_prompt(body.prompt)
    seeds = _seeds(body, 1)
    gen = ImageGenerationConfig(seed=seeds[0], height=height, width=width,
                                **_sampler(body, ctx.pipe.defaults.image))
    return Job("image", gen, [body.prompt] * len(seeds), seeds,
               prompt_usage=_text_tokens(ctx, body.prompt), timeout=ctx.timeout)
