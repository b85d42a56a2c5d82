"""Lightning glue shared by the callbacks (:mod:`lightning_peft.callbacks`) and the mixin (:mod:`lightning_peft.mixin`).

* :mod:`~lightning_peft.glue.hooks`: the one way the plugin extends a hook of a LightningModule or a strategy.
* :mod:`~lightning_peft.glue.prepare`: when and how adapters are injected into a LightningModule, the callbacks'
  shared base and the hooks a module that owns its PEFT set-up gets.
* :mod:`~lightning_peft.glue.checkpoints`: adapter-only Lightning checkpoints, and the checks when they load.
* :mod:`~lightning_peft.glue.strategies`: what FSDP1, FSDP2, DeepSpeed and distributed checkpoints need.

The package itself imports nothing: the core never needs Lightning, and each glue module imports what it uses.
"""
