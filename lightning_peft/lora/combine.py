r"""The arithmetic of weighted LoRA merging, one layer at a time (PEFT's names and definitions, our code).

Each source ``i`` of a layer is a LoRA update ``ΔW_i = s_i · B_i A_i`` (per group for grouped convolutions) with a
weight ``w_i``; the result is a new pair ``(A', B')`` with scale 1:

* ``"cat"``: ``A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B' = [B_1, B_2, ...]``, so ``B' A' = Σ w_i ΔW_i`` exactly,
  at rank ``Σ r_i``.
* ``"svd"``: ``Σ w_i ΔW_i`` truncated to its top ``svd_rank`` singular directions (``B' = U S``, ``A' = V^T``):
  exact when ``svd_rank`` is at least the sum's rank (``Σ r_i`` always is). ``"ties_svd"``, ``"dare_linear_svd"``,
  ``"dare_ties_svd"`` and ``"magnitude_prune_svd"`` combine the ``ΔW_i`` with the rule below instead of the sum.
* ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` combine the factors, not the
  products: the A's with weights ``sign(w_i s_i)·sqrt|w_i s_i|`` and the B's with ``sqrt|w_i s_i|``, each by the rule
  (so ``"linear"`` is ``(Σ b_i B_i)(Σ a_i A_i)``, which has cross terms: it equals ``Σ w_i ΔW_i`` only for one source).
  The ranks must be equal. The rules, on a list of tensors ``t_i`` with weights ``c_i``:

  - linear: ``Σ c_i t_i``;
  - magnitude_prune: keep the ``int(density · numel)`` largest ``|t_i|`` of each tensor, then ``Σ c_i t_i``;
  - ties (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): prune by magnitude as above, elect a sign per entry
    from the pruned tensors (``"total"``: the sign of ``Σ t_i``; ``"frequency"``: of ``Σ sign(t_i)``; ties elect +),
    then average ``c_i t_i`` over the tensors whose entry has the elected sign (the disjoint merge);
  - dare_linear / dare_ties (Yu et al. 2023, https://arxiv.org/abs/2311.03099): drop each entry with probability
    ``1 - density`` and rescale the kept ones by ``1 / density``, then linear / the ties sign election and merge.

  ``density = 1`` prunes nothing. DARE's masks come from one ``torch.Generator`` seeded by the caller and are drawn in
  PEFT's order (layers in module order; per layer the A's of every source, then the B's), so a seed reproduces a
  merge, and matches PEFT's after ``torch.manual_seed(seed)`` on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Combination = Literal[
    "cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
]
SignMethod = Literal["total", "frequency"]
#: Combinations that read ``density`` (the others refuse it).
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class Update:
    """One LoRA update of one layer: ``scale · b @ a`` per group, ``a (groups, r/groups, in)``, ``b (groups, out/groups,
    r/groups)`` (the stored factors reshaped, as :meth:`~lightning_peft.lora.LoRALayer.delta_matrix` reads them)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0] * self.a.shape[1]


def combine(updates: Sequence[Update], weights: Sequence[float], how: Combination, rank: int,
            density: float = 1.0, sign_method: SignMethod = "total",
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a', b')`` in the grouped layout of :class:`Update`, rank ``rank``, with ``b' @ a'`` the combination (scale 1).

    ``rank`` is the result's rank: ``Σ r_i`` for ``"cat"``, the (equal) ``r_i`` for the factor rules, the truncation
    for the ``svd`` family (a multiple of the groups; zero directions pad a sum of lower rank).
    """
    dtype = torch.promote_types(updates[0].a.dtype, torch.float32)
    if how == "cat":
        a = torch.cat([u.a.to(dtype) * (w * u.scale) for u, w in zip(updates, weights, strict=True)], dim=1)
        return a, torch.cat([u.b.to(dtype) for u in updates], dim=2)
    if how.endswith("svd"):
        deltas = [torch.bmm(u.b.to(dtype), u.a.to(dtype)) * u.scale for u in updates]  # (groups, out/g, in)
        rule = "linear" if how == "svd" else how.removesuffix("_svd")
        return truncated_svd(merge_tensors(deltas, list(weights), rule, density, sign_method, generator),
                             rank // updates[0].a.shape[0])
    signed = [w * u.scale for u, w in zip(updates, weights, strict=True)]
    a_weights = [math.sqrt(abs(c)) * (1.0 if c >= 0 else -1.0) for c in signed]  # the sign goes on A only
    b_weights = [math.sqrt(abs(c)) for c in signed]
    a = merge_tensors([u.a.to(dtype) for u in updates], a_weights, how, density, sign_method, generator)
    b = merge_tensors([u.b.to(dtype) for u in updates], b_weights, how, density, sign_method, generator)
    return a, b


def merge_tensors(tensors: list[torch.Tensor], weights: list[float], rule: str, density: float = 1.0,
                  sign_method: SignMethod = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """One rule of the module docstring on same-shaped tensors: ``"linear"``, ``"magnitude_prune"``, ``"ties"``,
    ``"dare_linear"`` or ``"dare_ties"``."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [magnitude_pruned(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [randomly_pruned(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # (sources, ...)
    scaled = stacked * torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).reshape(
        -1, *[1] * (stacked.dim() - 1))
    if rule not in ("ties", "dare_ties"):
        return scaled.sum(dim=0)
    votes = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked.sign() == elected
    return (scaled * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density · numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(int(density * flat.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def randomly_pruned(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` (drawn on CPU from ``generator``) and divided by it."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full(tensor.shape, density, dtype=tensor.dtype), generator=generator)
    return tensor * keep.to(tensor.device) / density


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a (groups, rank, in), b (groups, out, rank))`` with ``b @ a`` the top-``rank`` SVD part of each group of
    ``delta (groups, out, in)``; all singular values go to ``b`` (``U S``), as PEFT's; zero directions pad a
    ``rank`` above ``min(out, in)``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(rank, s.shape[-1])
    a = delta.new_zeros(delta.shape[0], rank, delta.shape[2])
    b = delta.new_zeros(delta.shape[0], delta.shape[1], rank)
    a[:, :kept] = vh[:, :kept]
    b[:, :, :kept] = u[:, :, :kept] * s[:, None, :kept]
    return a, b
