"""Continuous batching of text generation at block boundaries (the server's engine).

A `TextBatch` holds the rows being generated with one GenerationConfig (steps, guidance,
sampler, temperature, top-k, top-p); each row has its own prompt (and condition segments),
seed and token budget. Between blocks rows may JOIN (`add`) and LEAVE (`leave`, or by
finishing: EOS or budget); `step` generates the next block of every row at once, each row at
its own block index. A row's output depends on its own inputs and seed only:

- its prefix (VAE encoder, DiT prefix K/V, decoder prefix K/V) is encoded alone, exactly as
  a one-row `TextGenerator.stream` encodes it, then its caches are merged into the batch's
  padded caches (rows of different lengths; the padding is masked out of attention);
- its noise and token draws come from its own generators (`unified.generate.row_generators`);
- a row that leaves is sliced out of the caches (columns no row uses any more are dropped),
  so the rows that stay stop paying for it.

Fast path (`use_cache=True`): one batched DiT call per ODE step for all rows (both CFG
branches fused, as `_CachedPrior`), one batched decoder call per block. Slow reference path
(`use_cache=False`): every row keeps its own uncached `_ReferencePrior` and decoder and is
integrated on its own (the training layout re-run at every step): simple, and what the fast
path is tested against (tests/test_continuous.py).

The cache surgery (`_merge_prior`, `_select_prior`, `_flush`) works on `_CachedPrior`'s and
`_TextDecoder`'s fields; it lives here to keep unified/prior_session.py and unified/generate.py
unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from prior.dit import KVCache
from prior.flow import integrate
from unified.generate import (
    GenerationConfig,
    TextGenerator,
    _TextDecoder,
    row_generators,
    sample_block,
    take_tokens,
)
from unified.layout import MODALITY_TEXT, Segment, next_position
from unified.prior_session import _CachedPrior, open_session


@dataclass(eq=False)
class Slot:
    """One row of a TextBatch. `tag` is the caller's (e.g. (job, choice index))."""

    tag: object
    ids: list[int]  # [bos] + prompt ids
    z_prompt: torch.Tensor  # [S, d] normalized posterior means of the prompt
    n_full: int  # whole prompt blocks (a clean condition)
    tail: int  # prompt tokens pinned in the first generated block
    offset: int  # prior position of the text's first token
    budget: int
    noise_gen: torch.Generator
    token_gen: torch.Generator
    block: int = 0  # the next block to generate
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    prior: object | None = None  # reference path only: the row's own session and decoder
    decoder: _TextDecoder | None = None


class TextBatch:
    """Rows generated together block by block; rows join and leave between blocks."""

    def __init__(self, model, gen: GenerationConfig, use_cache: bool = True):
        self.engine = TextGenerator(model)
        self.model, self.gen, self.use_cache = model, gen, use_cache
        self.bs = self.engine.bs
        self.slots: list[Slot] = []
        self.prior: _CachedPrior | None = None  # fast path: the batch's merged session
        self.decoder: _TextDecoder | None = None
        self.rows_per_block: list[int] = []  # rows computed at each step (what left is gone)
        self.nfe = 0

    def __len__(self) -> int:
        return len(self.slots)

    # ------------------------------------------------------------------ joining and leaving
    @torch.no_grad()
    def add(self, prompt: str, seed: int, budget: int, tag: object = None,
            conditions: list[Segment] | None = None) -> Slot:
        """A new row (ValueError for a bad prompt: nothing joins). It is generated from the
        next `step` on, starting at its own first block."""
        gen = dataclasses.replace(self.gen, max_new_tokens=budget)
        offset = 0 if conditions is None else next_position(conditions)
        rows = self.engine._prepare([prompt], gen, conditions is not None, [offset])
        dev = rows.z_prompt.device
        slot = Slot(tag, rows.ids[0], rows.z_prompt[0], int(rows.n_full[0]), int(rows.tail[0]),
                    offset, budget, *row_generators([seed], seed, 1, dev),
                    *row_generators([seed], seed, 1, dev, offset=1))
        prefix = [[*(conditions or []),
                   *self.engine._prompt_segments(rows, 0, droppable=conditions is None)]]
        # text-to-text: CFG drops the pinned prompt tail too (as TextGenerator.stream)
        tail_drop = self.engine._block(rows, 0)[1] if conditions is None else None
        prior = open_session(self.model.prior, prefix, self.bs, self.gen.guidance, self.use_cache,
                             pinned_drop=tail_drop)
        decoder = _TextDecoder(self.model.vae, rows.z_prompt, rows.n_full, self.bs,
                               self.use_cache)
        if not self.use_cache:
            slot.prior, slot.decoder = prior, decoder
        elif self.prior is None:
            self.prior, self.decoder = prior, decoder
        else:
            self.nfe += _flush(self.prior)  # the last block's commit pass, before the merge
            self.prior = _merge_prior(self.prior, prior)
            self.decoder = _merge_decoder(self.decoder, decoder)
        self.nfe += prior.nfe
        self.slots.append(slot)
        return slot

    def leave(self, slots: list[Slot]) -> None:
        """These rows leave now (finished, or their client went away)."""
        gone = set(map(id, slots))
        keep = [i for i, s in enumerate(self.slots) if id(s) not in gone]
        if len(keep) == len(self.slots):
            return
        self.slots = [self.slots[i] for i in keep]
        if self.use_cache:
            if keep:
                self.prior = _select_prior(self.prior, keep)
                self.decoder = _select_decoder(self.decoder, keep)
            else:
                self.prior = self.decoder = None

    # ------------------------------------------------------------------ one block
    @torch.no_grad()
    def step(self) -> list[tuple[Slot, list[int]]]:
        """Finished rows leave; every other row gets its next block. Returns (slot, new ids)
        per row computed (slot.finished tells whether it is done)."""
        self.leave([s for s in self.slots if s.finished])
        if not self.slots:
            return []
        self.rows_per_block.append(len(self.slots))
        text_pos, pinned, values = self._block()
        b, d = len(self.slots), self.model.vae.config.latent_dim
        dev = values.device
        pos = (torch.tensor([s.offset for s in self.slots], device=dev)[:, None]
               + text_pos)[..., None].expand(b, self.bs, 2)
        mod = torch.full((b, self.bs), MODALITY_TEXT, dtype=torch.long, device=dev)
        eps = self.gen.noise_scale * torch.stack(
            [torch.randn(self.bs, d, device=dev, generator=s.noise_gen) for s in self.slots])
        m = self.model
        if self.use_cache:
            z = self._integrate(self.prior, eps, mod, pos, pinned, values)
            self.prior.commit(m.prior_in(z), mod, pos)
            logits = self.decoder.decode(z, text_pos)  # [B, bs, V]
        else:  # each row alone, against its own uncached history
            outs = []
            for r, s in enumerate(self.slots):
                sl = slice(r, r + 1)
                zr = self._integrate(s.prior, eps[sl], mod[sl], pos[sl], pinned[sl], values[sl])
                s.prior.commit(m.prior_in(zr), mod[sl], pos[sl])
                outs.append(s.decoder.decode(zr, text_pos[sl]))
            logits = torch.cat(outs)
        return self._emit(logits, pinned)

    def _integrate(self, prior, eps, mod, pos, pinned, values):
        m, d = self.model, eps.shape[-1]

        def velocity(z, t):
            return m.prior_out(prior.velocity(m.prior_in(z), t, mod, pos), d)

        before = prior.nfe
        z = integrate(velocity, eps, self.gen.sampler, pinned=pinned, pinned_value=values)
        self.nfe += prior.nfe - before
        return z

    def _block(self):
        """Text positions [B, bs] of each row's next block, pins and their values."""
        ar = torch.arange(self.bs)
        pos, pins, vals = [], [], []
        for s in self.slots:
            p = (s.n_full + s.block) * self.bs + ar.to(s.z_prompt.device)
            first = s.block == 0
            pins.append((ar < s.tail) & first)
            v = s.z_prompt[p.clamp_max(s.z_prompt.shape[0] - 1)] if first else \
                torch.zeros(self.bs, s.z_prompt.shape[-1], device=s.z_prompt.device)
            pos.append(p)
            vals.append(v)
        dev = self.slots[0].z_prompt.device
        return torch.stack(pos), torch.stack(pins).to(dev), torch.stack(vals)

    def _emit(self, logits, pinned) -> list[tuple[Slot, list[int]]]:
        """As TextGenerator._emit, per row with its own budget and token generator."""
        eos = self.model.tokenizer.eos_token_id
        gens = [s.token_gen for s in self.slots]
        sampled = sample_block(logits, self.gen, gens, eos).tolist()
        pins = pinned.tolist()
        out = []
        for i, s in enumerate(self.slots):
            new, hit = take_tokens(sampled[i], pins[i], s.budget - len(s.generated), eos)
            s.finished = s.finished or hit
            s.generated.extend(new)
            s.block += 1
            max_blocks = (s.budget + self.bs - 1) // self.bs + 1  # as TextGenerator.stream
            if len(s.generated) >= s.budget or s.block >= max_blocks:
                s.finished = True
            out.append((s, new))
        return out


# ---------------------------------------------------------------------- cache surgery
def _flush(s: _CachedPrior) -> int:
    """Run a pending commit pass on its own (the fused call would have done it with the
    next block's first step). Returns the calls made (0 or 1)."""
    if s.pending is None:
        return 0
    zp, mp, pp, hidden = s.pending
    t = torch.zeros(zp.shape[:2], device=zp.device)
    s.prior(s._rows(zp), s._rows(t), s._rows(mp), s._rows(pp), s._mask(hidden, 0),
            cache=s.cache, commit=True)
    s.pending = None
    s.key_valid = torch.cat([s.key_valid, ~hidden], 1)
    s.nfe += 1
    return 1


def _cache_rows(cache: KVCache, order: torch.Tensor, cols: torch.Tensor | None = None
                ) -> KVCache:
    """A new cache of cache's rows `order` (and committed columns `cols`, default all)."""
    out = KVCache(len(cache.k), cache.capacity)
    for i in range(len(cache.k)):
        k, v = cache.get(i)
        if k is None:
            continue
        if cols is not None:
            k, v = k[:, :, cols], v[:, :, cols]
        out.append(i, k[order], v[order])
    return out


def _pad_cat(a: torch.Tensor | None, b: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Concatenate along rows (dim 0), zero-padding both to the longer length along `dim`."""
    n = max(a.shape[dim], b.shape[dim])

    def pad(x):
        if x.shape[dim] == n:
            return x
        shape = list(x.shape)
        shape[dim] = n - x.shape[dim]
        return torch.cat([x, x.new_zeros(shape)], dim)

    return torch.cat([pad(a), pad(b)])


def _merge_prior(a: _CachedPrior, b: _CachedPrior) -> _CachedPrior:
    """One session of a's rows then b's (both without a pending block); the shorter caches
    are padded with masked-out columns. Internal row order stays [cond rows | uncond rows]."""
    ba, bb = a.key_valid.shape[0] - len(a.uncond), b.key_valid.shape[0] - len(b.uncond)
    ra = torch.arange(a.key_valid.shape[0])
    rb = torch.arange(b.key_valid.shape[0]) + len(ra)
    order = torch.cat([ra[:ba], rb[:bb], ra[ba:], rb[bb:]])
    s = _CachedPrior.__new__(_CachedPrior)
    s.prior, s.guidance, s.nfe, s.pending = a.prior, a.guidance, a.nfe + b.nfe, None
    s.uncond = torch.cat([a.uncond, b.uncond + ba])
    s.key_valid = _pad_cat(a.key_valid, b.key_valid, 1)[order.to(a.key_valid.device)]
    # the pinned prompt tokens each row's unconditional branch hides in its next block
    s.hidden = _pad_cat(a.hidden, b.hidden, 1)[order.to(a.hidden.device)]
    s.cache = KVCache(len(a.cache.k), a.cache.capacity)
    for i in range(len(a.cache.k)):
        (ka, va), (kb, vb) = a.cache.get(i), b.cache.get(i)
        if ka is None and kb is None:
            continue
        ka, va = _or_empty(ka, kb, ra), _or_empty(va, vb, ra)
        kb, vb = _or_empty(kb, ka, rb), _or_empty(vb, va, rb)
        dev = ka.device
        s.cache.append(i, _pad_cat(ka, kb, 2)[order.to(dev)], _pad_cat(va, vb, 2)[order.to(dev)])
    return s


def _or_empty(x, like, rows) -> torch.Tensor:
    """x, or a zero-length cache for `rows` rows shaped like `like` (a row without a prefix)."""
    if x is not None:
        return x
    return like.new_zeros(len(rows), like.shape[1], 0, like.shape[3])


def _select_prior(s: _CachedPrior, keep: list[int]) -> _CachedPrior:
    """The session of rows `keep` only (a pending block is kept for them); key columns that
    no remaining row can see are dropped."""
    b = s.key_valid.shape[0] - len(s.uncond)
    dev = s.key_valid.device
    keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
    where = {int(r): b + j for j, r in enumerate(s.uncond.tolist())}
    unc = [where[r] for r in keep if r in where]
    order = torch.cat([keep_t, torch.tensor(unc, dtype=torch.long, device=dev)])
    new_pos = {r: i for i, r in enumerate(keep)}
    out = _CachedPrior.__new__(_CachedPrior)
    out.prior, out.guidance, out.nfe = s.prior, s.guidance, s.nfe
    out.uncond = torch.tensor([new_pos[r] for r in keep if r in where], dtype=torch.long,
                              device=s.uncond.device)
    valid = s.key_valid[order]
    cols = valid.any(0).nonzero()[:, 0]
    out.key_valid = valid[:, cols]
    out.cache = _cache_rows(s.cache, order, cols)
    out.hidden = s.hidden[order]
    out.pending = None if s.pending is None else (
        *(x[keep_t] for x in s.pending[:3]), s.pending[3][order])  # hidden: [B + U] rows
    return out


def _merge_decoder(a: _TextDecoder, b: _TextDecoder) -> _TextDecoder:
    """One decoder of a's rows then b's; padded key columns have sample id -1 (masked)."""
    out = _TextDecoder.__new__(_TextDecoder)
    out.vae, out.bs, out.use_cache = a.vae, a.bs, a.use_cache
    out.z = _pad_cat(a.z, b.z, 1)
    out.sample = torch.cat([_pad_to(a.sample, b.sample.shape[1], -1),
                            _pad_to(b.sample, a.sample.shape[1], -1)])
    out.pos = _pad_cat(a.pos, b.pos, 1)
    if a.past is None and b.past is None:
        out.past = None
    else:
        pa = a.past or [_empty_kv(kv, a.z.shape[0]) for kv in b.past]
        pb = b.past or [_empty_kv(kv, b.z.shape[0]) for kv in a.past]
        out.past = [(_pad_cat(ka, kb, 2), _pad_cat(va, vb, 2))
                    for (ka, va), (kb, vb) in zip(pa, pb)]
    return out


def _pad_to(x: torch.Tensor, n: int, value: int) -> torch.Tensor:
    if x.shape[1] >= n:
        return x
    return torch.cat([x, x.new_full((x.shape[0], n - x.shape[1]), value)], 1)


def _empty_kv(kv, rows: int):
    k, v = kv
    return k.new_zeros(rows, k.shape[1], 0, k.shape[3]), v.new_zeros(rows, v.shape[1], 0,
                                                                     v.shape[3])


def _select_decoder(d: _TextDecoder, keep: list[int]) -> _TextDecoder:
    """The decoder of rows `keep` only; key columns no remaining row uses are dropped."""
    out = _TextDecoder.__new__(_TextDecoder)
    out.vae, out.bs, out.use_cache = d.vae, d.bs, d.use_cache
    k = torch.tensor(keep, dtype=torch.long, device=d.sample.device)
    sample = d.sample[k]
    cols = (sample >= 0).any(0).nonzero()[:, 0]
    out.sample, out.pos = sample[:, cols], d.pos[k][:, cols]
    out.z = d.z[k]  # the prompt latents (the cached path reads them only at its start)
    out.past = None if d.past is None else [(kk[k][:, :, cols], vv[k][:, :, cols])
                                            for kk, vv in d.past]
    return out
