"""A vision transformer adapted with VPT prompts (shallow and deep) and prefix tuning, next to a probe and LoRA.

Model: a small torchvision ``VisionTransformer`` (16x16 images, 4x4 patches, 4 blocks, width 64, 4 heads) from
random weights, first trained on digits 0-4 of scikit-learn's ``load_digits`` (see ``common.digits_transfer``),
then adapted to the unseen digits 5-9 from 40 labelled images per class with a fresh head:

* linear probe:  only the head (``heads``) trains;
* VPT-shallow:   ``PromptTuning(num_tokens=8, trainable_modules=["heads"])``: 8 prompt tokens after the class
                 token, entering the first block (Jia et al. 2022);
* VPT-deep:      ``PromptTuning(num_tokens=8, deep=True, ...)``: fresh prompt tokens at every block;
* prefix tuning: ``PrefixTuning(num_tokens=8, ...)``: 8 learned keys and values in every attention layer
                 (``nn.MultiheadAttention`` inside torchvision's encoder blocks);
* LoRA:          ``LoRA(r=8, target_modules="all-linear", ...)``: the attention's in/out projections and the MLPs.

Writes ``examples/results/vit_prompts_prefix.md`` and ``.png``. Run ``python examples/vit_prompts_prefix.py``
(about 2 minutes on 2 CPU cores) or ``--quick`` (a smoke run in about 15 s; results go to a temporary folder).
"""

from __future__ import annotations

import copy

import torch
from common import accuracy, comparison_args, digits_transfer, evaluate, fit_classifier, report
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft import LoRA, PrefixTuning, PromptTuning

HEAD = ["heads"]
METHODS = {  # name: (learning rate, callbacks factory, linear probe)
    "linear probe": (1e-2, lambda: [], True),
    "VPT-shallow p=8": (1e-2, lambda: [PromptTuning(num_tokens=8, trainable_modules=HEAD)], False),
    "VPT-deep p=8": (1e-2, lambda: [PromptTuning(num_tokens=8, deep=True, trainable_modules=HEAD)], False),
    "prefix tuning p=8": (1e-2, lambda: [PrefixTuning(num_tokens=8, trainable_modules=HEAD)], False),
    "LoRA r=8 all-linear": (3e-3, lambda: [LoRA(r=8, alpha=16, target_modules="all-linear",
                                                trainable_modules=HEAD)], False),
}


def small_vit(num_classes: int) -> nn.Module:
    """A torchvision ViT sized for 16x16 digits: 16 patches + a class token, 4 blocks of width 64."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=num_classes)


def main() -> None:
    args, out = comparison_args(__doc__ or "", "smoke run: small data, 1 epoch, far less accurate")
    pretrain_epochs, epochs = (1, 1) if args.quick else (30, 20)

    source, train, test = digits_transfer(size=16, labels_per_class=40, seed=args.seed, quick=args.quick)
    torch.manual_seed(args.seed)
    module, seconds = fit_classifier(small_vit(5), source, epochs=pretrain_epochs, lr=1e-3, seed=args.seed)
    backbone = module.net
    print(f"pretrained the ViT on {len(source)} images of digits 0-4 in {seconds:.0f} s "
          f"(train accuracy {accuracy(backbone, DataLoader(source, batch_size=256), 5):.3f})")
    test_loader = DataLoader(test, batch_size=256)

    results = []
    for method, (lr, make_callbacks, probe) in METHODS.items():
        net = copy.deepcopy(backbone)
        torch.manual_seed(args.seed)
        net.heads.head = nn.Linear(net.hidden_dim, 5)  # a new head for digits 5-9, the same init for every method
        module, seconds = fit_classifier(net, train, epochs=epochs, lr=lr, seed=args.seed, callbacks=make_callbacks(),
                                         probe_head="heads" if probe else None)
        results.append(evaluate(method, module.net, test_loader, 5, seconds))

    title = (f"ViT (4 blocks, width 64) pretrained on digits 0-4, adapted to digits 5-9 ({len(train)} train / "
             f"{len(test)} test images, {epochs} epochs{', quick run' if args.quick else ''})")
    report("vit_prompts_prefix", title, results, out)


if __name__ == "__main__":
    main()
