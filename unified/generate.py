"""Block-wise generation: prefix encode -> per-block flow transport -> decode (DESIGN §3).

The engine is task-agnostic: a batch of rows, each a list of condition Segments (any modality:
an instruction and an image, a caption, a text prompt's whole blocks), then a target that is
either text (blocks of `block_size` latents until EOS or the budget) or an image (one
bidirectional block).

Fast path (`use_cache=True`, `_CachedPrior` in unified/prior_session.py): the condition prefix
is encoded once into the DiT's KV cache; each new block is integrated from noise against that
cache, the conditional and unconditional CFG branches batched as rows of ONE forward per step
(fused CFG); a finished text block is decoded by the VAE decoder against its own cache and
committed to the DiT cache (its K/V at t = 0) inside the next block's first step: one call
fewer per block. A text prompt that does not end on a block boundary puts its trailing tokens
into the first generated block, pinned at t = 0 ("clean repaint"); in text-to-text CFG drops
them with the prompt's whole blocks, so even a prompt shorter than a block is guided.

Slow reference path (`use_cache=False`, `_ReferencePrior`): every step re-runs the whole
sequence through the DiT with the training Layout's attention rule, and decoding re-runs the
decoder over everything. Given the same seed both paths produce the same output
(tests/test_generate.py, tests/test_unified_generate.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from prior.flow import (
    check_int,
    integrate,
    interpolate,
    predict_data,
    velocity_target,
)
from unified.layout import (
    MODALITY_IMAGE,
    MODALITY_TEXT,
    SEG_N,
    Segment,
    image_positions,
    next_position,
    split_prompt,
    text_positions,
)
from unified.model import ColaModel
from unified.prior_session import open_session
from unified.sampling import MAX_SEED, GenerationConfig, ImageGenerationConfig  # noqa: F401


@dataclass
class BlockOutput:
    """One generated text block for every row: the new token ids and the text so far."""

    index: int
    new_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]
    nfe: int  # DiT forward calls so far (one fused CFG call counts once)
    latents: torch.Tensor  # [B, block, d] the block's prior-space latents


@dataclass
class ImageOutput:
    """Generated images: prior-space tokens, decoded pixels, and the denoising trajectory."""

    tokens: torch.Tensor  # [B, n, d] prior-space image tokens
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    trajectory: list[torch.Tensor]  # per recorded step: [B, 3, H, W] decode of the data estimate
    trajectory_t: list[float]  # the time of each recorded step
    nfe: int


def row_generators(seeds: list[int] | None, seed: int, rows: int, device, offset: int = 0
                   ) -> list[torch.Generator]:
    """One generator per row, seeded with seeds[r] + offset (default: every row the config's
    seed), so a row's draws depend on its own seed only, never on its batch mates."""
    seeds = [seed] * rows if seeds is None else list(seeds)
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} rows")
    return [torch.Generator(device=device).manual_seed(check_int("seed", s, 0, MAX_SEED) + offset)
            for s in seeds]


def row_randn(generators: list[torch.Generator], *shape: int, device) -> torch.Tensor:
    """[len(generators), *shape] standard normal noise, row r drawn from generators[r]."""
    return torch.stack([torch.randn(shape, device=device, generator=g) for g in generators])


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Sample ids from logits [..., V] with temperature / top-k / top-p (0 temp = argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(probs.shape[:-1])


def sample_block(logits: torch.Tensor, gen: GenerationConfig,
                 generators: list[torch.Generator], eos: int | None = None) -> torch.Tensor:
    """Token ids [B, bs] of one block's logits [B, bs, V]: argmax at temperature 0 (no draws,
    one call for the whole batch), else each row drawn from its own generator, so a row's
    tokens depend on its own seed only. `gen.ignore_eos` masks the `eos` logit."""
    if gen.ignore_eos and eos is not None:
        logits = logits.clone()
        logits[..., eos] = float("-inf")
    if gen.temperature == 0:
        return logits.argmax(-1)
    return torch.stack([sample_tokens(row, gen.temperature, gen.top_k, gen.top_p, g)
                        for row, g in zip(logits, generators)])


def take_tokens(sampled: list[int], pinned: list[bool], room: int, eos: int
                ) -> tuple[list[int], bool]:
    """The new tokens of one row's block: the sampled ids where the block is not pinned to the
    prompt, at most `room` of them, cut before the first EOS. Returns (ids, hit EOS)."""
    out: list[int] = []
    for tok, pin in zip(sampled, pinned):
        if len(out) >= room:
            break
        if pin:
            continue
        if tok == eos:
            return out, True
        out.append(tok)
    return out, False


# --------------------------------------------------------------------------------------------
# the text decoder, fast and slow


class _TextDecoder:
    """Decodes text blocks with the VAE decoder: against its own KV cache (fast) or by
    re-running everything decoded so far (reference). Positions are the text's own (VAE)."""

    def __init__(self, vae, z_prompt: torch.Tensor, n_prompt: torch.Tensor, block_size: int,
                 use_cache: bool):
        self.vae, self.bs, self.use_cache = vae, block_size, use_cache
        b, dev = z_prompt.shape[0], z_prompt.device
        lc = int(n_prompt.max()) * block_size if b else 0
        ar = torch.arange(lc, device=dev)
        valid = ar[None] < (n_prompt * block_size)[:, None]  # [B, Lc]
        self.z = z_prompt[:, :lc] * valid[..., None]
        self.sample = torch.where(valid, 0, -1)
        self.pos = ar.expand(b, lc).clone()
        self.past = None
        if use_cache and lc:
            _, self.past = vae.decode(vae.denormalize(self.z), self.sample, self.pos)

    def decode(self, z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, bs, V] of block z [B, bs, d] at text positions pos [B, bs]."""
        sample = torch.zeros(pos.shape, dtype=torch.long, device=z.device)
        vae = self.vae
        if self.use_cache:
            logits, self.past = vae.decode(vae.denormalize(z), sample, pos, self.past,
                                           self.sample, self.pos)
        else:
            allz = torch.cat([self.z, z], 1)
            logits, _ = vae.decode(vae.denormalize(allz), torch.cat([self.sample, sample], 1),
                                   torch.cat([self.pos, pos], 1))
            logits = logits[:, -z.shape[1]:]
            self.z = allz
        self.sample = torch.cat([self.sample, sample], 1)
        self.pos = torch.cat([self.pos, pos], 1)
        return logits


# --------------------------------------------------------------------------------------------
# text generation (text-to-text, and image-to-text with condition rows)


@dataclass
class _Rows:
    """Per-row prompt bookkeeping (latent units; patch_size 1 means latent == token)."""

    ids: list[list[int]]
    z_prompt: torch.Tensor  # [B, Smax, d] normalized posterior means
    n_full: torch.Tensor  # [B] whole prompt blocks (segment C)
    tail: torch.Tensor  # [B] prompt tokens pinned in the first generated block
    offset: torch.Tensor  # [B] prior position of the text's first token
    generated: list[list[int]]


class TextGenerator:
    """Generates text with a trained ColaModel: continuations of prompts (text-to-text) or,
    given condition rows (e.g. an instruction and an image), text that follows them."""

    def __init__(self, model: ColaModel):
        if model.prior is None:
            raise ValueError("this model has no prior (a stage-1 VAE); train stage 2 first")
        if model.vae.config.patch_size != 1:
            raise ValueError(
                f"block-wise generation supports patch_size 1 (one latent per token); this "
                f"model's Text VAE has patch_size {model.vae.config.patch_size}")
        self.model = model
        self.vae, self.prior, self.tok = model.vae, model.prior, model.tokenizer
        self.bs = model.block_size

    @property
    def context(self) -> int:
        return self.vae.config.max_len

    def _prepare(self, prompts: list[str], gen: GenerationConfig, conditioned: bool,
                 offsets: list[int]) -> _Rows:
        if not prompts:
            raise ValueError("no prompts given")
        ids = []
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"a prompt must be a string, got {type(p).__name__}")
            if not conditioned and not p.strip():
                raise ValueError("the prompt is empty: give some text to continue")
            # as in training (vaes.tokenizer.encode_document): a literal "<eos>" is text
            body = self.tok.encode(p, add_special_tokens=False, split_special_tokens=True) \
                if p.strip() else []
            row = [self.tok.bos_token_id, *body]
            if len(row) + gen.max_new_tokens > self.context:
                raise ValueError(
                    f"prompt is too long: {len(row)} tokens + max_new_tokens "
                    f"{gen.max_new_tokens} exceed the model's context of {self.context} tokens "
                    f"(shorten the prompt or lower max_new_tokens)")
            ids.append(row)
        z_prompt = self.model.encode_texts(ids)
        dev = z_prompt.device
        lengths = torch.tensor([len(r) for r in ids], device=dev)
        return _Rows(ids, z_prompt, lengths // self.bs, lengths % self.bs,
                     torch.tensor(offsets, device=dev), [[] for _ in ids])

    def _prompt_segments(self, rows: _Rows, r: int, droppable: bool) -> list[Segment]:
        """The prompt as training places it (`split_prompt`): its whole blocks a clean
        condition C (CFG drops it when `droppable`), the rest pinned in the first block."""
        n = len(rows.ids[r])
        text = Segment(SEG_N, rows.z_prompt[r, :n], MODALITY_TEXT,
                       text_positions(int(rows.offset[r]), n).to(rows.z_prompt.device), True,
                       prompt=n, prompt_droppable=droppable)
        return [seg for seg, _ in split_prompt([text], self.bs) if not seg.target]

    def _block(self, rows: _Rows, g: int):
        """Text positions [B, bs] of generated block g, pins (bool [B, bs], values [B, bs, d])."""
        b, d = rows.z_prompt.shape[0], rows.z_prompt.shape[-1]
        ar = torch.arange(self.bs, device=rows.z_prompt.device)
        text_pos = ((rows.n_full + g) * self.bs)[:, None] + ar  # [B, bs]
        pinned = (ar[None] < rows.tail[:, None]) & (g == 0)
        values = torch.zeros(b, self.bs, d, device=rows.z_prompt.device)
        if g == 0:
            idx = text_pos.clamp_max(rows.z_prompt.shape[1] - 1)
            values = rows.z_prompt.gather(1, idx[..., None].expand(b, self.bs, d))
        return text_pos, pinned, values

    def _emit(self, rows: _Rows, logits, pinned, gen, token_gens, finished, budget):
        """Tokens of one block per row: prompt ids where pinned, sampled elsewhere; cut at EOS."""
        sampled = sample_block(logits, gen, token_gens, self.tok.eos_token_id).tolist()
        pins = pinned.tolist()
        new_ids = []
        for i in range(len(rows.ids)):
            out: list[int] = []
            if not finished[i]:
                room = budget - len(rows.generated[i])
                out, eos = take_tokens(sampled[i], pins[i], room, self.tok.eos_token_id)
                finished[i] = finished[i] or eos
            rows.generated[i].extend(out)
            if len(rows.generated[i]) >= budget:
                finished[i] = True
            new_ids.append(out)
        return new_ids

    @torch.no_grad()
    def stream(self, prompts: list[str], gen: GenerationConfig | None = None,
               use_cache: bool = True, conditions: list[list[Segment]] | None = None,
               seeds: list[int] | None = None) -> Iterator[BlockOutput]:
        """Yield a BlockOutput after each generated block until every row hit EOS or budget.

        `conditions` (one list of placed Segments per prompt, e.g. an instruction and an
        image) come before the text; CFG then drops their droppable parts. Without them the
        prompt's whole blocks are the condition CFG drops (text-to-text). `seeds`: one per row
        (default: gen.seed for every row); a row's output depends on its own seed only."""
        gen = gen or GenerationConfig()
        if conditions is not None and len(conditions) != len(prompts):
            raise ValueError(f"{len(conditions)} condition rows for {len(prompts)} prompts")
        offsets = [next_position(c) for c in conditions] if conditions else [0] * len(prompts)
        rows = self._prepare(prompts, gen, conditions is not None, offsets)
        dev, d = rows.z_prompt.device, rows.z_prompt.shape[-1]
        prefix_rows = [[*(conditions[r] if conditions else []),
                        *self._prompt_segments(rows, r, droppable=conditions is None)]
                       for r in range(len(prompts))]
        # text-to-text: the whole prompt is the condition, its pinned tail too (CFG drops it)
        tail_drop = self._block(rows, 0)[1] if conditions is None else None
        prior = open_session(self.prior, prefix_rows, self.bs, gen.guidance, use_cache,
                             pinned_drop=tail_drop)
        decoder = _TextDecoder(self.vae, rows.z_prompt, rows.n_full, self.bs, use_cache)
        noise_gens = row_generators(seeds, gen.seed, len(prompts), dev)
        token_gens = row_generators(seeds, gen.seed, len(prompts), dev, offset=1)
        finished = [False] * len(prompts)
        max_blocks = (gen.max_new_tokens + self.bs - 1) // self.bs + 1
        b = len(prompts)
        mod = torch.full((b, self.bs), MODALITY_TEXT, dtype=torch.long, device=dev)
        for g in range(max_blocks):
            text_pos, pinned, values = self._block(rows, g)
            pos = (rows.offset[:, None] + text_pos)[..., None].expand(b, self.bs, 2)
            eps = gen.noise_scale * row_randn(noise_gens, self.bs, d, device=dev)

            def velocity(z, t, pos=pos):
                return self.model.prior_out(prior.velocity(self.model.prior_in(z), t, mod, pos), d)

            z = integrate(velocity, eps, gen.sampler, pinned=pinned, pinned_value=values)
            prior.commit(self.model.prior_in(z), mod, pos)
            logits = decoder.decode(z, text_pos)  # [B, bs, V]
            new_ids = self._emit(rows, logits, pinned, gen, token_gens, finished,
                                 gen.max_new_tokens)
            texts = [self.tok.decode(g_, skip_special_tokens=True) for g_ in rows.generated]
            yield BlockOutput(g, new_ids, texts, list(finished), prior.nfe, z)
            if all(finished):
                break

    def generate(self, prompts: list[str] | str, gen: GenerationConfig | None = None,
                 use_cache: bool = True, conditions: list[list[Segment]] | None = None,
                 seeds: list[int] | None = None) -> list[str] | str:
        single = isinstance(prompts, str)
        *_, last = self.stream([prompts] if single else prompts, gen, use_cache, conditions, seeds)
        return last.texts[0] if single else last.texts


# --------------------------------------------------------------------------------------------
# image generation (text-to-image)


class ImageGenerator:
    """Generates images with a unified ColaModel: each row's conditions (e.g. a caption) then
    the image as one bidirectional block of latent tokens, decoded by the image VAE."""

    def __init__(self, model: ColaModel):
        if model.prior is None or model.image_vae is None:
            raise ValueError("this model has no image side (an image VAE and a prior with an "
                             "image modality): it cannot generate images")
        self.model = model

    @torch.no_grad()
    def generate(self, conditions: list[list[Segment]], gen: ImageGenerationConfig | None = None,
                 use_cache: bool = True, trajectory: int = 0,
                 on_step: Callable[[int, int], None] | None = None,
                 seeds: list[int] | None = None) -> ImageOutput:
        """`trajectory` > 0 records that many evenly spaced data estimates z0_hat = z_t - t v
        along the way (decoded to images, for the demo's denoising strip); `on_step(i, steps)`
        is called after every ODE step. `seeds`: one per row (default: gen.seed for every
        row); a row's noise depends on its own seed only."""
        gen = gen or ImageGenerationConfig()
        m = self.model
        dev = next(m.prior.parameters()).device
        grid = m.image_grid(gen.height, gen.width).to(dev)  # None: the training size
        b, n, d = len(conditions), grid.shape[0], m.image_token_dim
        prior = open_session(m.prior, conditions, m.block_size, gen.guidance, use_cache)
        pos = torch.stack([image_positions(grid, next_position(c)) for c in conditions])
        mod = torch.full((b, n), MODALITY_IMAGE, dtype=torch.long, device=dev)
        eps = row_randn(row_generators(seeds, gen.seed, b, dev), n, d, device=dev)
        steps = gen.sampler.steps
        keep = set() if trajectory <= 0 else {
            round(i * (steps - 1) / max(1, trajectory - 1)) for i in range(min(trajectory, steps))}
        estimates: list[tuple[float, torch.Tensor]] = []

        def velocity(z, t):
            return m.prior_out(prior.velocity(m.prior_in(z), t, mod, pos), d)

        def record(i, z, v, t):
            if i in keep:
                estimates.append((float(t.flatten()[0]), predict_data(z, v, t)))
            if on_step is not None:
                on_step(i + 1, steps)

        z = integrate(velocity, eps, gen.sampler, callback=record)
        images = m.decode_image_tokens(z, gen.height, gen.width)
        traj = [m.decode_image_tokens(e, gen.height, gen.width) for _, e in estimates]
        return ImageOutput(z, images, traj, [t for t, _ in estimates], prior.nfe)

    @torch.no_grad()
    def flow_loss(self, conditions: list[list[Segment]], tokens: torch.Tensor,
                  times: tuple[float, ...] = (0.3, 0.5, 0.7, 0.85), seed: int = 0,
                  use_cache: bool = True) -> tuple[torch.Tensor, int]:
        """How well each row's conditions explain an image: the flow-matching loss
        E_t ||v(z_t, t | conditions) - (eps - z0)||^2 of its prior-space tokens [B, n, d],
        averaged over `times`, with the same noise for every row (common random numbers, so
        rows are compared, not their noise). Lower is better: the prior's conditional
        likelihood proxy, e.g. to rank candidate captions of an image ("analysis by
        synthesis"). Returns (loss [B], prior calls made)."""
        m = self.model
        dev = tokens.device
        grid = m.image_grid().to(dev)
        b, n, d = tokens.shape
        k = len(times)
        rows = [c for c in conditions for _ in times]  # row-major: (row, time)
        prior = open_session(m.prior, rows, m.block_size, 1.0, use_cache)
        eps = torch.randn(k, n, d, device=dev,
                          generator=torch.Generator(device=dev).manual_seed(seed)).repeat(b, 1, 1)
        t = torch.tensor(times, device=dev).repeat(b)[:, None].expand(b * k, n)
        z0 = tokens.repeat_interleave(k, 0)  # [B k, n, d]
        z_t = interpolate(z0, eps, t)
        pos = torch.stack([image_positions(grid, next_position(c)) for c in rows])
        mod = torch.full((b * k, n), MODALITY_IMAGE, dtype=torch.long, device=dev)
        v = m.prior_out(prior.velocity(m.prior_in(z_t), t, mod, pos), d)
        err = (v - velocity_target(z0, eps)).pow(2).mean((1, 2))  # [B k]
        return err.view(b, k).mean(1), prior.nfe
