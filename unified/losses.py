"""Loss terms as (sum, count) pairs, so that a mean over several micro-batches and ranks is
exact: the mean of a term over any set of slices of a global batch is the sum of their sums
over the sum of their counts, whatever the slices hold (a rank whose slice has no sample of
some task contributes (0, 0) to that task's flow loss).

A training forward returns `Terms` (name -> (sum, count)); `combine` functions turn means into
the loss and must be linear in the means (given which terms are present), so that the sum of
every rank's `combine(local sums / global counts)` is the loss of the whole global batch.
"""

from __future__ import annotations

import torch

Terms = dict[str, tuple[torch.Tensor, torch.Tensor]]


def from_mean(mean: torch.Tensor, count: torch.Tensor | int | float) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """(sum, count) of a term given as a mean over `count` items (0 items: sum 0)."""
    count = torch.as_tensor(count, dtype=torch.float32, device=mean.device)
    return mean * count, count


def absent(device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sum, count) of a term this slice has nothing for."""
    zero = torch.zeros((), device=device)
    return zero, zero


def means(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor | float]
          ) -> dict[str, torch.Tensor]:
    """sum / count of every term with a positive count (the others are absent)."""
    return {k: sums[k] / float(counts[k]) for k in sums if float(counts[k]) > 0}
