"""Lightning glue: the method callbacks, which inject adapters before the strategy wraps the model.

``Callback.setup`` runs before ``configure_model``; when the LightningModule builds its layers there, the
callback injects right after it instead. Either way the adapters exist before DDP/FSDP/DeepSpeed and the
optimizer capture the parameters. Checkpoints then hold adapter tensors only (also with
``ModelCheckpoint(save_weights_only=True)``, which skips callback hooks: the module's own hook does it). How and
when is :mod:`lightning_peft.glue`, which the mixin shares.
"""

from __future__ import annotations

from lightning_peft.glue.prepare import MethodCallback
from lightning_peft.lora import LoRAConfig
from lightning_peft.prefix import PrefixTuningConfig
from lightning_peft.prompt import PromptTuningConfig
from lightning_peft.spawn import install_spawn_recovery


class LoRA(LoRAConfig, MethodCallback):
    """LoRA as a Lightning callback: freezes the model and trains low-rank updates of the selected layers.

    Takes the arguments of :class:`~lightning_peft.lora.LoRAConfig` (``r``, ``alpha``, ``dropout``,
    ``target_modules``, ``exclude_modules``, ``trainable_modules``, ...). The same object also works without a
    Trainer: ``inject(model, LoRA(r=8))``.

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["query", "value"],
                                            trainable_modules=["classifier"])])
    """


class PrefixTuning(PrefixTuningConfig, MethodCallback):
    """Prefix tuning as a Lightning callback: freezes the model and trains per-layer key/value prefixes.

    Takes the arguments of :class:`~lightning_peft.prefix.PrefixTuningConfig` (``num_tokens``, ``reparameterize``,
    ``hidden_size``, ``layers``, ``gate``, ``trainable_modules``, ...). Works for transformers models (through
    their attention interface), ``nn.MultiheadAttention`` and timm ``Attention``; the same object also works
    without a Trainer: ``inject(model, PrefixTuning(num_tokens=10))``.

    Example::

        trainer = L.Trainer(callbacks=[PrefixTuning(num_tokens=20, reparameterize=True, hidden_size=512)])
    """


class PromptTuning(PromptTuningConfig, MethodCallback):
    """Soft prompts as a Lightning callback: freezes the model and trains prompts for text, ViTs or CNNs.

    Takes the arguments of :class:`~lightning_peft.prompt.PromptTuningConfig` (``num_tokens``, ``init``,
    ``init_text``, ``tokenizer``, ``kind``, ``deep``, ``width``, ``trainable_modules``, ...). The kind is detected
    from the model when ``kind`` is omitted: token prompts for transformers language models, patch-token prompts
    (VPT) for torchvision/timm/transformers ViTs, pixel prompts for other image models. The same object also
    works without a Trainer: ``inject(model, PromptTuning(num_tokens=8))``.

    Example::

        trainer = L.Trainer(callbacks=[PromptTuning(num_tokens=20, init="text", init_text="Classify the sentiment:",
                                                    tokenizer="path/to/tokenizer")])
    """


install_spawn_recovery()  # ddp_spawn/ddp_notebook: the main process's module gets the workers' adapters
