r"""LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): the B factors learn ``loraplus_ratio`` times faster.

In ``ΔW = B A`` the factor A reads the layer's ``n``-wide input and B writes its ``n``-wide output from the
``r``-wide code. The paper's width analysis (§3) shows that one shared learning rate makes feature learning
inefficient as ``n`` grows, and that ``η_B = λ · η_A`` with ``λ ≫ 1`` fixes it (§4 uses ``λ = 2^4 = 16``; PEFT's
``loraplus_lr_ratio`` is the same ``λ``)::

    group "lora_B"    every B factor (output side)                          lr · loraplus_ratio   weight_decay
    group "default"   A factors, prompts, prefixes, trainable_modules ≥ 2-D  lr                    weight_decay
    group "no_decay"  0-/1-D tensors: biases, norm scales                   lr                    0

:func:`param_groups` returns these groups for any optimizer, so the optimizer, its scheduler and its checkpointed
state stay the LightningModule's (``configure_optimizers``), unlike PEFT's ``create_loraplus_optimizer``, which
builds the optimizer itself. Which tensor is a B factor is read from the adapter modules (``LoRALayer.lora_B``,
``lora_out_B`` of ``nn.MultiheadAttention``, the per-expert ``lora_B`` of ``target_parameters``), never from names.

Embeddings: our (and PEFT's) embedding LoRA looks up columns of ``A (r, vocab)`` and maps them to the model width
with ``B (dim, r)``; A starts at zero and B random, the reverse of other layers. B is still the output-side
factor that the paper's argument speeds up (A's input is one token, not an ``n``-wide sum), so it is in
``"lora_B"``. PEFT instead puts both embedding factors in a group of their own at ``loraplus_lr_embedding``
(1e-6 by default) and gives biases ``lr · ratio``; here biases train at ``lr``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_peft.lora.attention import LoRAMultiheadAttention
from lightning_peft.lora.layers import LoRALayer
from lightning_peft.lora.parameters import LoRAParameters


def b_factors(module: nn.Module) -> list[torch.Tensor]:
    """The output-side LoRA factors ``module`` owns itself (none for a module that is not a LoRA adapter)."""
    if isinstance(module, LoRAParameters):
        return list(module.lora_B.values())
    if isinstance(module, LoRAMultiheadAttention):
        return [module.lora_B, module.lora_out_B]
    if isinstance(module, LoRALayer):
        return [module.lora_B]
    return []


def param_groups(
    model: nn.Module, lr: float, loraplus_ratio: float = 16.0, weight_decay: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: every trainable tensor of ``model`` once, LoRA's B factors at
    ``lr * loraplus_ratio``.

    Three groups, each with a ``"name"`` (Lightning's ``LearningRateMonitor`` logs it): ``"lora_B"`` (every B
    factor, ``lr * loraplus_ratio``), ``"default"`` (every other trainable tensor with 2 or more dimensions: A
    factors, prompt and prefix tensors, ``trainable_modules`` weights; ``lr``) and ``"no_decay"`` (0-/1-D tensors:
    biases, norm scales; ``lr``, weight decay 0). Empty groups are left out. Frozen tensors are in none, and
    adapters parked by :func:`~lightning_peft.set_adapter` neither: call it where the optimizer is built
    (``configure_optimizers``), after the adapters are in place.

    Weight decay: ``None`` (default) leaves the ``"weight_decay"`` key out of the first two groups, so the
    optimizer's own ``weight_decay=`` applies to them; a number sets it there. The ``"no_decay"`` group always
    gets 0 (decaying a bias or a norm scale towards 0 is not regularisation). As in the paper's code and PEFT's
    ``create_loraplus_optimizer``, B's decay is not divided by the ratio: AdamW's decoupled decay is multiplied by
    the group's learning rate, so B shrinks ``loraplus_ratio`` times faster per step than A.

    Args:
        model: The adapted model (a LightningModule: ``param_groups(self, lr)``).
        lr: Learning rate of A factors and every other trainable tensor (``η_A``).
        loraplus_ratio: ``η_B / η_A``; the paper's default ``2^4 = 16`` (§4). 1 gives plain LoRA with groups.
        weight_decay: Weight decay of the decayed groups, or ``None`` for the optimizer's own.

    Returns:
        A list of dicts for any ``torch.optim.Optimizer`` (``params``, ``lr``, ``name``, maybe ``weight_decay``).

    Raises:
        ValueError: A non-positive or non-finite ``lr`` or ``loraplus_ratio``, a negative ``weight_decay``; nothing
            in ``model`` trains; or a trainable B factor is not a parameter of ``model`` (FSDP1 with
            ``use_orig_params=False`` flattens them).

    Example:
        >>> from lightning_peft import LoRAConfig, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
        ...                LoRAConfig(r=2, target_modules=["0"], trainable_modules=["1"]))
        >>> groups = param_groups(model, lr=1e-4)
        >>> [(g["name"], g["lr"], len(g["params"])) for g in groups]
        [('lora_B', 0.0016, 1), ('default', 0.0001, 2), ('no_decay', 0.0001, 1)]
        >>> optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    """
    for label, value in (("lr", lr), ("loraplus_ratio", loraplus_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"param_groups: {label} must be a positive finite number; got {value!r}.")
    if weight_decay is not None and not 0 <= weight_decay < math.inf:
        raise ValueError(f"param_groups: weight_decay must be >= 0 (or None: the optimizer's); got {weight_decay!r}.")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"param_groups: nothing in {type(model).__name__} requires grad. Inject the adapters first "
                         "(build the optimizer in configure_optimizers, after the LoRA callback or PEFTMixin injects).")
    registered = {id(p) for p in trainable}
    b_ids: set[int] = set()
    for name, module in model.named_modules():
        for factor in b_factors(module):
            if factor.requires_grad and id(factor) not in registered:
                raise ValueError(
                    f"param_groups: the B factor of {name!r} trains but is not a parameter of the model (FSDP1 with "
                    "use_orig_params=False flattens parameters before configure_optimizers). Use "
                    "FSDPStrategy(use_orig_params=True) (Lightning's default)."
                )
            b_ids.add(id(factor))
    decay = {} if weight_decay is None else {"weight_decay": float(weight_decay)}
    groups = [
        {"name": "lora_B", "params": [p for p in trainable if id(p) in b_ids], "lr": lr * loraplus_ratio, **decay},
        {"name": "default", "params": [p for p in trainable if id(p) not in b_ids and p.dim() >= 2], "lr": lr,
         **decay},
        {"name": "no_decay", "params": [p for p in trainable if id(p) not in b_ids and p.dim() < 2], "lr": lr,
         "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
