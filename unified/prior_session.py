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
    follows as rows [B, B + U) for the U rows with something to drop: a droppable condition in
    the prefix, or droppable prompt tokens pinned in the first generated block (`pinned_drop`:
    a text prompt shorter than a block). A row with neither would compute exactly its
    conditional output again, so it gets no unconditional row: its CFG combination is its
    conditional velocity. In an unconditional row the pinned prompt tokens are hidden from the
    rest of their block and, once committed, from every later block, as training hides them
    in a dropped sample (unified.layout.Layout.attention_mask)."""

    def __init__(self, prior, prefix: Layout, guidance: float, pinned_drop: torch.Tensor):
        self.prior, self.guidance = prior, guidance
        self.nfe = 0
        self.cache = prior.new_cache()
        self.pending: tuple | None = None  # a finished block awaiting its commit pass
        valid = prefix.valid
        droppable = (valid & prefix.droppable).any(1) | pinned_drop.any(1)  # [B]
        self.uncond = droppable.nonzero()[:, 0] if guidance != 1.0 else droppable.new_zeros(
            0, dtype=torch.long)
        u = self.uncond
        # [B + U, n]: tokens of the block being generated that its unconditional rows hide
        self.hidden = torch.cat([torch.zeros_like(pinned_drop), pinned_drop[u]])
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

    def _mask(self, pending_hidden: torch.Tensor | None, n_new: int) -> torch.Tensor:
        """Keys: the cache (valid per row) + [the pending clean block] + the noisy block. The
        pending block's rows see the cache and themselves; the noisy rows see everything,
        except the hidden (dropped, pinned) tokens, which only hidden tokens see."""
        rb, dev = self.key_valid.shape[0], self.key_valid.device
        n_pending = 0 if pending_hidden is None else pending_hidden.shape[1]
        n = n_pending + n_new
        cache = self.key_valid[:, None, :].expand(rb, n, -1)
        new = torch.ones(rb, n, n, dtype=torch.bool, device=dev)
        new[:, :n_pending, n_pending:] = False  # the clean block never sees the noisy one
        cur = self.hidden if self.hidden.shape[1] == n_new else self.hidden.new_zeros(rb, n_new)
        hidden = cur if pending_hidden is None else torch.cat([pending_hidden, cur], 1)  # [rb, n]
        new &= ~(hidden[:, None, :] & ~hidden[:, :, None])
        return torch.cat([cache, new], 2)

    def velocity(self, z, t, modality, pos):
        """One fused call for both CFG branches; the pending commit pass rides along."""
        b = z.shape[0]
        n_p, pending_hidden = 0, None
        if self.pending is not None:
            zp, mp, pp, pending_hidden = self.pending
            n_p = zp.shape[1]
            z = torch.cat([zp, z], 1)
            t = torch.cat([torch.zeros(zp.shape[:2], device=zp.device), t], 1)
            modality, pos = torch.cat([mp, modality], 1), torch.cat([pp, pos], 1)
        v = self.prior(self._rows(z), self._rows(t), self._rows(modality), self._rows(pos),
                       self._mask(pending_hidden, z.shape[1] - n_p), cache=self.cache,
                       commit=n_p if n_p else False)[:, n_p:].float()
        self.nfe += 1
        if n_p:
            self.pending = None
            self.key_valid = torch.cat([self.key_valid, ~pending_hidden], 1)
        if not len(self.uncond):
            return v
        v_cond, v_uncond = v[:b], v[:b].clone()
        v_uncond[self.uncond] = v[b:]
        return cfg_combine(v_cond, v_uncond, self.guidance)

    def commit(self, z, modality, pos) -> None:
        """A finished block joins the history (its K/V are computed in the next call; the
        unconditional rows keep its dropped pinned tokens hidden)."""
        hidden = self.hidden if self.hidden.shape[1] == z.shape[1] else \
            self.hidden.new_zeros(self.hidden.shape[0], z.shape[1])
        self.pending = (z, modality, pos, hidden)
        self.hidden = torch.zeros_like(hidden)  # later blocks pin nothing


class _ReferencePrior:
    """No cache: every call re-runs [clean history | noisy block] as one Layout (the training
    attention rule), one call per CFG branch."""

    def __init__(self, prior, prefix: Layout, guidance: float, pinned_drop: torch.Tensor):
        self.prior, self.guidance = prior, guidance
        self.branches = 1 if guidance == 1.0 else 2
        self.nfe = 0
        self.hist = prefix  # grows by one block per commit
        self.pinned_drop = pinned_drop  # the first block's dropped prompt tokens

    def _drop(self, n: int) -> torch.Tensor | None:
        return self.pinned_drop if self.pinned_drop.shape[1] == n else None

    def velocity(self, z, t, modality, pos):
        outs = []
        noisy = append_block(self.hist, z, t, modality, pos, noisy=True,
                             droppable=self._drop(z.shape[1]))
        for dropped in (False, True)[: self.branches]:
            lay = noisy.with_dropped(dropped)
            v = self.prior(lay.z, lay.t, lay.modality, lay.positions, lay.attention_mask())
            outs.append(v[:, -z.shape[1]:].float())
            self.nfe += 1
        return outs[0] if len(outs) == 1 else cfg_combine(outs[0], outs[1], self.guidance)

    def commit(self, z, modality, pos) -> None:
        self.hist = append_block(self.hist, z, torch.zeros(z.shape[:2], device=z.device),
                                 modality, pos, noisy=False, droppable=self._drop(z.shape[1]))
        self.pinned_drop = self.pinned_drop[:, :0]  # later blocks pin nothing


def open_session(prior, conditions: list[list[Segment]], block_size: int, guidance: float,
                 use_cache: bool = True, pinned_drop: torch.Tensor | None = None):
    """The prior's state for generating after each row's placed condition segments (prefix
    laid out by `condition_layout`, as training lays out its history): `velocity(z, t,
    modality, positions)` of a new block, then `commit(...)` of the finished block.
    `pinned_drop` [B, n] (bool): prompt tokens pinned in the first generated block that CFG
    drops with the condition (a text-to-text prompt's tail); default none."""
    dev = next(prior.parameters()).device
    prefix = condition_layout(conditions, block_size, prior.latent_width, dev)
    if pinned_drop is None:
        pinned_drop = torch.zeros(len(conditions), 0, dtype=torch.bool, device=dev)
    return (_CachedPrior if use_cache else _ReferencePrior)(prior, prefix, guidance,
                                                            pinned_drop.to(dev))
