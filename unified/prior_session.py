"""The prior's state during block-wise generation, fast and slow (DESIGN §3 "Generation").

`open_session` lays out each row's condition segments as training lays out its history
(`unified.layout.condition_layout`) and returns an object with `velocity(z, t, modality,
positions)` for the block being generated and `commit(...)` for a finished one:

- `_CachedPrior` (fast): the prefix is encoded once into the DiT's KV cache; both CFG branches
  run as rows of ONE forward per step; a committed block's K/V are computed inside the next
  block's first step.
- `_ReferencePrior` (slow reference): every call re-runs [clean history | noisy block] as one
  training Layout (`append_block`), one call per CFG branch.

Both give the same velocities (tests/test_unified_generate.py), and the fast one gives the
2L training layout's outputs block by block (tests/test_layout_engine.py).
"""

from __future__ import annotations

import torch

from prior.flow import cfg_combine
from unified.layout import Layout, Segment, append_block, condition_layout


class _CachedPrior:
    """KV-cached prior state. Rows [0, B) are the conditional branch; the unconditional branch
    follows as rows [B, B + U) for the U rows whose condition has a droppable part. A row
    without one (e.g. a prompt shorter than a block) would compute exactly its conditional
    output again, so it gets no unconditional row: its CFG combination is its conditional
    velocity."""

    def __init__(self, prior, prefix: Layout, guidance: float):
        self.prior, self.guidance = prior, guidance
        self.nfe = 0
        self.cache = prior.new_cache()
        self.pending: tuple | None = None  # a finished block awaiting its commit pass
        valid = prefix.valid
        droppable = (valid & prefix.droppable).any(1)  # [B]
        self.uncond = droppable.nonzero()[:, 0] if guidance != 1.0 else droppable.new_zeros(
            0, dtype=torch.long)
        u = self.uncond
        self.key_valid = torch.cat([valid, (valid & ~prefix.droppable)[u]])
        if prefix.z.shape[1]:
            masks = [prefix.with_dropped(False).attention_mask()]
            if len(u):
                masks.append(prefix.with_dropped(True).attention_mask()[u])
            prior(self._rows(prefix.z), self._rows(prefix.t), self._rows(prefix.modality),
                  self._rows(prefix.positions), torch.cat(masks), cache=self.cache, commit=True)
            self.nfe += 1

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ...] -> [B + U, ...]: the conditional rows, then the unconditional ones."""
        return torch.cat([x, x[self.uncond]]) if len(self.uncond) else x

    def _mask(self, n_pending: int, n_new: int) -> torch.Tensor:
        """Keys: the cache (valid per row) + [the pending clean block] + the noisy block. The
        pending block's rows see the cache and themselves; the noisy rows see everything."""
        rb, dev = self.key_valid.shape[0], self.key_valid.device
        n = n_pending + n_new
        cache = self.key_valid[:, None, :].expand(rb, n, -1)
        new = torch.ones(rb, n, n, dtype=torch.bool, device=dev)
        new[:, :n_pending, n_pending:] = False  # the clean block never sees the noisy one
        return torch.cat([cache, new], 2)

    def velocity(self, z, t, modality, pos):
        """One fused call for both CFG branches; the pending commit pass rides along."""
        b = z.shape[0]
        n_p = 0
        if self.pending is not None:
            zp, mp, pp = self.pending
            n_p = zp.shape[1]
            z = torch.cat([zp, z], 1)
            t = torch.cat([torch.zeros(zp.shape[:2], device=zp.device), t], 1)
            modality, pos = torch.cat([mp, modality], 1), torch.cat([pp, pos], 1)
        v = self.prior(self._rows(z), self._rows(t), self._rows(modality), self._rows(pos),
                       self._mask(n_p, z.shape[1] - n_p), cache=self.cache,
                       commit=n_p if n_p else False)[:, n_p:].float()
        self.nfe += 1
        if n_p:
            self.pending = None
            self.key_valid = torch.cat([self.key_valid, torch.ones(
                self.key_valid.shape[0], n_p, dtype=torch.bool, device=z.device)], 1)
        if not len(self.uncond):
            return v
        v_cond, v_uncond = v[:b], v[:b].clone()
        v_uncond[self.uncond] = v[b:]
        return cfg_combine(v_cond, v_uncond, self.guidance)

    def commit(self, z, modality, pos) -> None:
        """A finished block joins the history (its K/V are computed in the next call)."""
        self.pending = (z, modality, pos)


class _ReferencePrior:
    """No cache: every call re-runs [clean history | noisy block] as one Layout (the training
    attention rule), one call per CFG branch."""

    def __init__(self, prior, prefix: Layout, guidance: float):
        self.prior, self.guidance = prior, guidance
        self.branches = 1 if guidance == 1.0 else 2
        self.nfe = 0
        self.hist = prefix  # grows by one block per commit

    def velocity(self, z, t, modality, pos):
        outs = []
        noisy = append_block(self.hist, z, t, modality, pos, noisy=True)
        for dropped in (False, True)[: self.branches]:
            lay = noisy.with_dropped(dropped)
            v = self.prior(lay.z, lay.t, lay.modality, lay.positions, lay.attention_mask())
            outs.append(v[:, -z.shape[1]:].float())
            self.nfe += 1
        return outs[0] if len(outs) == 1 else cfg_combine(outs[0], outs[1], self.guidance)

    def commit(self, z, modality, pos) -> None:
        self.hist = append_block(self.hist, z, torch.zeros(z.shape[:2], device=z.device),
                                 modality, pos, noisy=False)


def open_session(prior, conditions: list[list[Segment]], block_size: int, guidance: float,
                 use_cache: bool = True):
    """The prior's state for generating after each row's placed condition segments (prefix
    laid out by `condition_layout`, as training lays out its history): `velocity(z, t,
    modality, positions)` of a new block, then `commit(...)` of the finished block."""
    dev = next(prior.parameters()).device
    prefix = condition_layout(conditions, block_size, prior.latent_width, dev)
    return (_CachedPrior if use_cache else _ReferencePrior)(prior, prefix, guidance)
