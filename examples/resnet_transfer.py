"""ResNet-18 transfer with LoRA and pixel prompts, side by side with a linear probe and full finetuning.

The task (see ``common.digits_transfer``): a torchvision ResNet-18 from random weights is first trained on the
handwritten digits 0-4 of scikit-learn's ``load_digits`` (8x8 images upsampled to 32x32), which makes it a
backbone that "knows" digits. Each method then adapts a copy of it to the unseen digits 5-9 from 40 labelled
images per class, with a fresh 5-class head (the same init for every method), and is tested on the other
images of 5-9:

* linear probe:                the backbone is frozen, only the head trains;
* pixel prompt:                ``PromptTuning(kind="pixels", width=4, image_size=32, trainable_modules=["fc"])``,
                               a learned 4-pixel frame added to every image (Bahng et al. 2022);
* LoRA:                        ``LoRA(r=8, target_modules="all-conv", trainable_modules=["fc"])``;
* LoRA + pixel prompt:         both callbacks on one Trainer;
* full finetuning:             every weight trains.

Writes ``examples/results/resnet_transfer.md`` and ``.png`` (accuracy against trainable parameters).

Run ``python examples/resnet_transfer.py`` (about 2 minutes on 2 CPU cores) or ``--quick`` (a smoke run in
about 20 s: little data, 1 epoch, results written to a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import copy

import torch
from common import accuracy, comparison_args, digits_transfer, evaluate, fit_classifier, report
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import LoRA, PromptTuning, merge_and_unload

METHODS = {  # name: (learning rate, callbacks factory, linear probe)
    "linear probe": (1e-2, lambda: [], True),
    "pixel prompt w=4 + head": (1e-2, lambda: [PromptTuning(kind="pixels", width=4, image_size=32,
                                                            trainable_modules=["fc"])], False),
    "LoRA r=8 all convs + head": (3e-3, lambda: [LoRA(r=8, alpha=16, target_modules="all-conv",
                                                      trainable_modules=["fc"])], False),
    "LoRA r=8 + pixel prompt": (3e-3, lambda: [LoRA(r=8, alpha=16, target_modules="all-conv", trainable_modules=["fc"]),
                                               PromptTuning(kind="pixels", width=4, image_size=32)], False),
    "full finetuning": (1e-3, lambda: [], False),
}


def pretrain_backbone(source: TensorDataset, epochs: int, seed: int) -> nn.Module:
    """A torchvision ResNet-18 (random init) trained on digits 0-4."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    module, seconds = fit_classifier(resnet18(num_classes=5), source, epochs=epochs, lr=2e-3, seed=seed)
    source_acc = accuracy(module.net, DataLoader(source, batch_size=256), 5)
    print(f"pretrained ResNet-18 on digits 0-4 in {seconds:.0f} s (train accuracy {source_acc:.3f})")
    return module.net


def main() -> None:
    args, out = comparison_args(__doc__ or "", "smoke run: small data, 1 epoch, far less accurate")
    pretrain_epochs, epochs = (1, 1) if args.quick else (4, 10)

    source, train, test = digits_transfer(size=32, labels_per_class=40, seed=args.seed, quick=args.quick)
    print(f"source: {len(source)} images of digits 0-4; target: {len(train)} train / {len(test)} test images of 5-9")
    backbone = pretrain_backbone(source, pretrain_epochs, args.seed)
    test_loader = DataLoader(test, batch_size=256)

    results = []
    for method, (lr, make_callbacks, probe) in METHODS.items():
        net = copy.deepcopy(backbone)
        torch.manual_seed(args.seed)
        net.fc = nn.Linear(net.fc.in_features, 5)  # a new head for digits 5-9, the same init for every method
        module, seconds = fit_classifier(net, train, epochs=epochs, lr=lr, seed=args.seed, callbacks=make_callbacks(),
                                         probe_head="fc" if probe else None)
        results.append(evaluate(method, module.net, test_loader, 5, seconds))
        if method.startswith("LoRA r=8 all"):
            merged = merge_and_unload(copy.deepcopy(module.net))  # plain torchvision ResNet-18 again
            print(f"  merged into plain convs: accuracy {accuracy(merged, test_loader, 5):.3f}")

    title = (f"ResNet-18 pretrained on digits 0-4, adapted to digits 5-9 ({len(train)} train / {len(test)} test "
             f"images, {epochs} epochs{', quick run' if args.quick else ''})")
    report("resnet_transfer", title, results, out)


if __name__ == "__main__":
    main()
