"""Block-wise text generation: prefix encode -> per-block flow transport -> conditional decode.

Fast path (DESIGN §3 "Generation"): the prompt's whole blocks are encoded once into the DiT's
KV cache and the VAE decoder's cache; each new block is integrated from noise with the cache as
history, conditional and unconditional branches batched in ONE forward per step (fused CFG);
the finished block is decoded by the VAE decoder against its own cache, and committed to the
DiT cache (its K/V at t = 0) inside the next block's first step: one call fewer per block.
A prompt that does not end on a block boundary puts its trailing tokens into the first
generated block, pinned at t = 0 ("clean repaint").

Slow reference path (`use_cache=False`): every step re-runs the whole sequence through the DiT
with the Layout's attention rule, and decoding re-runs the decoder over everything. Given the
same seed both paths produce the same tokens (tests/test_generate.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from prior.attention import TokenMeta, block_causal_mask, ensure_nonempty_rows
from prior.flow import SamplerConfig, cfg_combine, integrate
from unified.layout import MODALITY_TEXT, SEG_C, SEG_N, SEG_PAD, Layout
from unified.model import ColaModel


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    steps: int = 8
    guidance: float = 2.0
    shift: float = 1.0
    method: str = "euler"
    temperature: float = 0.0  # token sampling in the decoder; 0 = greedy (the flow samples)
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (0.0 <= self.temperature <= 10.0):
            raise ValueError(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _ = self.sampler  # validates steps / method / shift / guidance

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(self.steps, self.method, self.shift, self.guidance)


@dataclass
class BlockOutput:
    """One generated block for every row: the new token ids and the text so far."""

    index: int
    new_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]
    nfe: int  # DiT forward calls so far (one fused CFG call counts once)
    latents: torch.Tensor  # [B, block, d] the block's prior-space latents


@dataclass
class _Rows:
    """Per-row prompt bookkeeping (latent units; patch_size 1 means latent == token)."""

    ids: list[list[int]]
    z_prompt: torch.Tensor  # [B, Smax, d] normalized posterior means
    n_full: torch.Tensor  # [B] whole prompt blocks (segment C)
    tail: torch.Tensor  # [B] prompt tokens pinned in the first generated block
    generated: list[list[int]] = field(default_factory=list)


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


class TextGenerator:
    """Generates continuations of prompts with a trained ColaModel."""

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

    # ----------------------------------------------------------------- prompt handling
    def _prepare(self, prompts: list[str], gen: GenerationConfig) -> _Rows:
        if not prompts:
            raise ValueError("no prompts given")
        ids = []
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError("the prompt is empty: give some text to continue")
            # as in training (vaes.tokenizer.encode_document): a literal "<eos>" is text
            body = self.tok.encode(p, add_special_tokens=False, split_special_tokens=True)
            row = [self.tok.bos_token_id, *body]
            if len(row) + gen.max_new_tokens > self.context:
                raise ValueError(
                    f"prompt is too long: {len(row)} tokens + max_new_tokens "
                    f"{gen.max_new_tokens} exceed the model's context of {self.context} tokens "
                    f"(shorten the prompt or lower max_new_tokens)")
            ids.append(row)
        dev = self.vae.device
        b, smax = len(ids), max(map(len, ids))
        input_ids = torch.full((b, smax), self.tok.pad_token_id, dtype=torch.long, device=dev)
        sample = torch.full((b, smax), -1, dtype=torch.long, device=dev)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, device=dev)
            sample[i, : len(row)] = 0
        positions = torch.arange(smax, device=dev).expand(b, smax)
        mean, _ = self.vae.encode(input_ids, sample, positions)
        lengths = torch.tensor([len(r) for r in ids], device=dev)
        return _Rows(ids, self.vae.normalize(mean), lengths // self.bs, lengths % self.bs,
                     [[] for _ in ids])

    def _block_positions(self, rows: _Rows, g: int) -> torch.Tensor:
        start = (rows.n_full + g) * self.bs  # [B]
        return start[:, None] + torch.arange(self.bs, device=start.device)  # [B, bs]

    def _pins(self, rows: _Rows, g: int):
        """(pinned [B, bs] bool, pinned values [B, bs, d]) for generated block g."""
        b, d = rows.z_prompt.shape[0], rows.z_prompt.shape[-1]
        ar = torch.arange(self.bs, device=rows.z_prompt.device)
        pinned = (ar[None] < rows.tail[:, None]) & (g == 0)
        values = torch.zeros(b, self.bs, d, device=rows.z_prompt.device)
        if g == 0:
            idx = (rows.n_full * self.bs)[:, None] + ar  # prompt positions of the tail
            idx = idx.clamp_max(rows.z_prompt.shape[1] - 1)
            values = rows.z_prompt.gather(1, idx[..., None].expand(b, self.bs, d))
        return pinned, values

    def _emit(self, rows: _Rows, g: int, logits, pinned, gen, token_gen, finished, budget):
        """Tokens of block g per row: prompt ids where pinned, sampled elsewhere; cut at EOS."""
        sampled = sample_tokens(logits, gen.temperature, gen.top_k, gen.top_p, token_gen)
        new_ids = []
        for i in range(len(rows.ids)):
            out = []
            for j in range(self.bs):
                if finished[i] or len(rows.generated[i]) + len(out) >= budget:
                    break
                if pinned[i, j]:
                    continue
                tok = int(sampled[i, j])
                if tok == self.tok.eos_token_id:
                    finished[i] = True
                    break
                out.append(tok)
            rows.generated[i].extend(out)
            if len(rows.generated[i]) >= budget:
                finished[i] = True
            new_ids.append(out)
        return new_ids

    def _texts(self, rows: _Rows) -> list[str]:
        return [self.tok.decode(g, skip_special_tokens=True) for g in rows.generated]

    # ----------------------------------------------------------------- public API
    @torch.no_grad()
    def stream(self, prompts: list[str], gen: GenerationConfig | None = None,
               use_cache: bool = True) -> Iterator[BlockOutput]:
        """Yield a BlockOutput after each generated block until every row hit EOS or budget."""
        gen = gen or GenerationConfig()
        rows = self._prepare(prompts, gen)
        dev = rows.z_prompt.device
        noise_gen = torch.Generator(device=dev).manual_seed(gen.seed)
        token_gen = torch.Generator(device=dev).manual_seed(gen.seed + 1)
        impl = _CachedPath(self, rows, gen) if use_cache else _ReferencePath(self, rows, gen)
        finished = [False] * len(prompts)
        max_blocks = (gen.max_new_tokens + self.bs - 1) // self.bs + 1
        d = rows.z_prompt.shape[-1]
        for g in range(max_blocks):
            pinned, values = self._pins(rows, g)
            eps = torch.randn(len(prompts), self.bs, d, device=dev, generator=noise_gen)
            pos = self._block_positions(rows, g)
            z = integrate(lambda z, t, pos=pos: impl.velocity(z, t, pos), eps, gen.sampler,
                          pinned=pinned, pinned_value=values)  # [B, bs, d]
            logits = impl.commit(z, pos)  # [B, bs, V]
            new_ids = self._emit(rows, g, logits, pinned, gen, token_gen, finished,
                                 gen.max_new_tokens)
            yield BlockOutput(g, new_ids, self._texts(rows), list(finished), impl.nfe, z)
            if all(finished):
                break

    def generate(self, prompts: list[str] | str, gen: GenerationConfig | None = None,
                 use_cache: bool = True) -> list[str] | str:
        single = isinstance(prompts, str)
        *_, last = self.stream([prompts] if single else prompts, gen, use_cache)
        return last.texts[0] if single else last.texts


class _CachedPath:
    """KV-cached DiT + decoder state. Rows [0, B) are conditional, [B, 2B) unconditional."""

    def __init__(self, g: TextGenerator, rows: _Rows, gen: GenerationConfig):
        self.g, self.rows, self.gen = g, rows, gen
        self.branches = 1 if gen.guidance == 1.0 else 2
        self.nfe = 0
        b, bs, dev = rows.z_prompt.shape[0], g.bs, rows.z_prompt.device
        lc = int(rows.n_full.max()) * bs  # prompt region, left-padded so all rows end together
        ar = torch.arange(lc, device=dev)
        pad = lc - rows.n_full * bs  # [B]
        valid = ar[None] >= pad[:, None]  # [B, Lc]
        self.c_pos = (ar[None] - pad[:, None]).clamp_min(0)  # [B, Lc]
        src = self.c_pos.clamp_max(rows.z_prompt.shape[1] - 1)
        cz = rows.z_prompt.gather(1, src[..., None].expand(b, lc, rows.z_prompt.shape[-1]))
        cz = cz * valid[..., None]
        self.cache = g.prior.new_cache()
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # block awaiting commit
        # key validity per branch: the unconditional branch never sees the prompt blocks (C)
        self.key_valid = torch.cat([valid, torch.zeros_like(valid)][: self.branches])
        if lc:
            sample = torch.where(valid, 0, -1)
            meta = TokenMeta(sample, self.c_pos // bs, torch.zeros_like(valid))
            mask = ensure_nonempty_rows(block_causal_mask(meta, meta))
            rep = self.branches
            g.prior(cz.repeat(rep, 1, 1), torch.zeros(rep * b, lc, device=dev),
                    self._modality(rep * b, lc), self.c_pos.repeat(rep, 1), mask.repeat(rep, 1, 1),
                    cache=self.cache, commit=True)
            self.nfe += 1
        # decoder cache over the prompt's whole blocks
        self.dec_sample = torch.where(valid, 0, -1)
        self.dec_pos = self.c_pos
        self.dec_past = None
        if lc:
            _, self.dec_past = g.vae.decode(g.vae.denormalize(cz), self.dec_sample, self.c_pos)

    def _modality(self, b: int, n: int) -> torch.Tensor:
        return torch.full((b, n), MODALITY_TEXT, dtype=torch.long, device=self.key_valid.device)

    def _mask(self, pending: bool) -> torch.Tensor:
        """Keys of the cache (valid per row) + [the pending clean block] + the noisy block.
        The pending block's own rows see the cache and themselves; the noisy rows see all."""
        rb, bs, dev = self.key_valid.shape[0], self.g.bs, self.key_valid.device
        n_new = 2 * bs if pending else bs
        cache = self.key_valid[:, None, :].expand(rb, n_new, -1)
        new = torch.ones(rb, n_new, n_new, dtype=torch.bool, device=dev)
        if pending:
            new[:, :bs, bs:] = False  # the clean block never sees the noisy one
        return torch.cat([cache, new], 2)

    def velocity(self, z, t, pos):
        """One fused call: both CFG branches as rows; the previous block's commit pass (its
        clean K/V appended to the cache) rides along with the first step of this block."""
        rep, b, bs = self.branches, z.shape[0], self.g.bs
        pending = self.pending is not None
        if pending:
            zp, pp = self.pending
            z_in = torch.cat([zp, z], 1)
            t_in = torch.cat([torch.zeros_like(t), t], 1)
            pos_in = torch.cat([pp, pos], 1)
        else:
            z_in, t_in, pos_in = z, t, pos
        n = z_in.shape[1]
        v = self.g.prior(z_in.repeat(rep, 1, 1), t_in.repeat(rep, 1), self._modality(rep * b, n),
                         pos_in.repeat(rep, 1), self._mask(pending), cache=self.cache,
                         commit=bs if pending else False)[:, n - z.shape[1]:]
        self.nfe += 1
        if pending:
            self.pending = None
            self.key_valid = torch.cat(
                [self.key_valid, torch.ones(rep * b, bs, dtype=torch.bool, device=z.device)], 1)
        if rep == 1:
            return v
        v_cond, v_uncond = v.chunk(2)
        return cfg_combine(v_cond, v_uncond, self.gen.guidance)

    def commit(self, z, pos):
        """Decode block z against the decoder cache (logits [B, bs, V]); its DiT commit pass
        is deferred into the next block's first step (never run after the last block)."""
        b, bs = z.shape[0], self.g.bs
        self.pending = (z, pos)
        sample = torch.zeros(b, bs, dtype=torch.long, device=z.device)
        logits, self.dec_past = self.g.vae.decode(
            self.g.vae.denormalize(z), sample, pos, self.dec_past, self.dec_sample, self.dec_pos)
        self.dec_sample = torch.cat([self.dec_sample, sample], 1)
        self.dec_pos = torch.cat([self.dec_pos, pos], 1)
        return logits


class _ReferencePath:
    """No caches: every call recomputes the full sequence (the slow ground truth)."""

    def __init__(self, g: TextGenerator, rows: _Rows, gen: GenerationConfig):
        self.g, self.gen = g, gen
        self.branches = 1 if gen.guidance == 1.0 else 2
        self.nfe = 0
        b, bs = rows.z_prompt.shape[0], g.bs
        # history per row as python lists of (latent [d], position); prompt whole blocks first
        self.hist_z = [rows.z_prompt[i, : int(rows.n_full[i]) * bs] for i in range(b)]
        self.hist_pos = [torch.arange(int(rows.n_full[i]) * bs, device=rows.z_prompt.device)
                         for i in range(b)]
        self.n_cond = [int(rows.n_full[i]) * bs for i in range(b)]

    def _layout(self, z_blk, t_blk, pos_blk, drop: bool) -> Layout:
        """One row-batch Layout: [clean history | noisy block], right-padded per row."""
        b, bs, d = z_blk.shape
        dev = z_blk.device
        lh = max(h.shape[0] for h in self.hist_z)
        n = lh + bs
        z = torch.zeros(b, n, d, device=dev)
        t = torch.zeros(b, n, device=dev)
        pos = torch.zeros(b, n, dtype=torch.long, device=dev)
        sample = torch.full((b, n), -1, dtype=torch.long, device=dev)
        noisy = torch.zeros(b, n, dtype=torch.bool, device=dev)
        seg = torch.full((b, n), SEG_PAD, dtype=torch.long, device=dev)
        for i in range(b):
            h = self.hist_z[i].shape[0]
            z[i, :h], pos[i, :h], sample[i, :h] = self.hist_z[i], self.hist_pos[i], 0
            seg[i, :h] = SEG_N
            seg[i, : self.n_cond[i]] = SEG_C
            z[i, lh:], t[i, lh:], pos[i, lh:] = z_blk[i], t_blk[i], pos_blk[i]
            sample[i, lh:], noisy[i, lh:], seg[i, lh:] = 0, True, SEG_N
        meta = TokenMeta(sample, pos // self.g.bs, noisy)
        dropped = torch.full((b, n), drop, dtype=torch.bool, device=dev)
        return Layout(z, t, torch.zeros_like(pos), pos, meta, seg, seg == SEG_C, dropped, noisy)

    def velocity(self, z, t, pos):
        outs = []
        for drop in (False, True)[: self.branches]:
            lay = self._layout(z, t, pos, drop)
            v = self.g.prior(lay.z, lay.t, lay.modality, lay.positions, lay.attention_mask())
            outs.append(v[:, -z.shape[1]:])
            self.nfe += 1
        return outs[0] if len(outs) == 1 else cfg_combine(outs[0], outs[1], self.gen.guidance)

    def commit(self, z, pos):
        b, bs = z.shape[:2]
        for i in range(b):
            self.hist_z[i] = torch.cat([self.hist_z[i], z[i]])
            self.hist_pos[i] = torch.cat([self.hist_pos[i], pos[i]])
        # decode everything from scratch (right-padded rows) and keep the last block
        lh = max(h.shape[0] for h in self.hist_z)
        d = z.shape[-1]
        zz = torch.zeros(b, lh, d, device=z.device)
        pp = torch.zeros(b, lh, dtype=torch.long, device=z.device)
        ss = torch.full((b, lh), -1, dtype=torch.long, device=z.device)
        for i in range(b):
            h = self.hist_z[i].shape[0]
            zz[i, :h], pp[i, :h], ss[i, :h] = self.hist_z[i], self.hist_pos[i], 0
        logits, _ = self.g.vae.decode(self.g.vae.denormalize(zz), ss, pp)
        ends = torch.tensor([h.shape[0] for h in self.hist_z], device=z.device)
        idx = ends[:, None] - bs + torch.arange(bs, device=z.device)
        return logits.gather(1, idx[..., None].expand(b, bs, logits.shape[-1]))
