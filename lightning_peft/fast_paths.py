"""Torch's fused inference paths that read a layer's weights themselves, switched off where adapters live.

``nn.TransformerEncoderLayer`` in eval mode (with ``batch_first=True``, and whenever no weight it reads requires
grad, so always under ``no_grad``) calls ``torch._transformer_encoder_layer_fwd`` with ``self.linear1.weight``,
``self.self_attn.in_proj_weight`` and the rest: its children's ``forward`` never runs, so a LoRA adapter on
``linear1``, ``linear2`` or ``self_attn`` would be silently ignored. Torch skips that path for a layer any of whose
modules has a forward hook; :func:`avoid_fused_paths` gives each such layer that holds an adapter a hook that does
nothing, so it computes through its modules in every mode (train and eval then agree). Its
``nn.TransformerEncoder`` stops turning padded inputs into nested tensors (``use_nested_tensor``), which our
adapters' layers would receive otherwise. Only these modules change, not torch's process-wide
``torch.backends.mha`` switch; ``unload`` undoes both.

``nn.MultiheadAttention``'s own fast path needs nothing: LoRA runs it with folded weights (see
:mod:`lightning_peft.lora.attention`). ``nn.TransformerDecoderLayer`` has no fused path. Paths this module does not
know are caught at run time by the participation check (:mod:`lightning_peft.guard`).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from lightning_peft.adapter import Adapter
from lightning_peft.record import add_peft_hook, record


def _through_modules(module: nn.Module, args: Any) -> None:
    """Does nothing: its presence makes ``nn.TransformerEncoderLayer`` compute through its modules."""


def avoid_fused_paths(model: nn.Module) -> None:
    """Make every ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` of ``model`` that holds an adapter compute
    through its modules in every mode (idempotent; ``unload`` undoes it)."""
    for module in model.modules():
        if not any(isinstance(sub, Adapter) for sub in module.modules()):
            continue
        hooks = module._forward_pre_hooks.values()
        if isinstance(module, nn.TransformerEncoderLayer) and _through_modules not in hooks:
            add_peft_hook(module, module.register_forward_pre_hook(_through_modules))
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            module.use_nested_tensor = False
            record(module).undo.append(functools.partial(_restore_nested, module))


def _restore_nested(encoder: nn.TransformerEncoder, keep_weights: bool) -> None:
    encoder.use_nested_tensor = True
