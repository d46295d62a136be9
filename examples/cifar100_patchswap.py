"""Intra-class patch swap self-distillation on CIFAR-100 with a ResNet-18 (the patch-swap paper's
protocol), with ``fastsd.recipes.PatchSwapDistillation``.

    python examples/cifar100_patchswap.py [--data ./data] [--epochs 200] [--compile]
    python examples/cifar100_patchswap.py --fake-data --epochs 1     # no download: FakeData of the same shape

Data: torchvision's ``CIFAR100`` (downloaded into ``--data`` when absent and online), random crop
of the 4-px padded image and horizontal flip, normalised with CIFAR-100's channel statistics.
Model: ResNet-18 for 32 x 32 inputs (3 x 3 stem, no max-pool; ``--width`` scales it). Training:
SGD with momentum 0.9, weight decay 5e-4, batch 128, learning rate 0.1 divided by 10 at 50 % and
75 % of the epochs, 200 epochs: a standard CIFAR schedule (CS-KD's, which the patch-swap method
builds on); the paper's own schedule may differ, and every value is a flag. Each step: random
same-class pairs in the batch, a patch swap between the members of each pair, the forward pass,
cross-entropy plus the temperature-scaled KL from the more confident member of each pair to the
other (``fastsd.pair_kd_loss``). ``--ratio``, ``--temperature``, ``--kd-weight``, ``--prob``
default to the recipe's defaults.

On CUDA: bf16 autocast and channels_last (``--amp off``, ``--channels-last off`` turn them off),
``--compile`` for ``torch.compile``. Prints per-epoch test accuracy and time per step, and, from
``torch.profiler`` over a few steps of the first epoch, the share of the step that fastsd's ops
(patch swap, the loss and its backward) take; the pairing and mask draws are a few small torch ops
not counted there.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402

import fastsd.recipes  # noqa: E402


def main(argv=None) -> dict:
    p = C.parser(__doc__, epochs=200, batch_size=128, lr=0.1, width=64)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--ratio", type=float, default=None, help="share of the grid's cells swapped (recipe default)")
    p.add_argument("--prob", type=float, default=None, help="probability that a pair swaps at all (recipe default)")
    p.add_argument("--temperature", type=float, default=None, help="KL temperature (recipe default)")
    p.add_argument("--kd-weight", type=float, default=None, help="weight of the KL term (recipe default)")
    args = p.parse_args(argv)

    env = C.setup(args)
    train_set, test_set = C.datasets(args, C.standard_augmentation())
    train_loader, test_loader = C.loaders(args, train_set, test_set, env)
    model = C.prepare_model(args, C.resnet18(args.width), env)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[max(1, args.epochs // 2), max(1, 3 * args.epochs // 4)], gamma=0.1)
    options = {k: getattr(args, k) for k in ("ratio", "prob", "temperature", "kd_weight")
               if getattr(args, k) is not None}
    recipe = fastsd.recipes.PatchSwapDistillation(model, **options)
    print(recipe, flush=True)

    def step(x, y, epoch, progress):
        return recipe(x, y)  # dict(loss, logits, partner, mask)

    return C.train(args, "cifar100_patchswap", model, train_loader, test_loader, env, step, optimizer, scheduler)


if __name__ == "__main__":
    main()
