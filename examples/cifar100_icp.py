"""Iterative constructive perturbation (ICP) self-distillation on CIFAR-100 with a ResNet-20 (the
ICP paper's protocol), with ``fastsd.recipes.ICPDistillation``.

    python examples/cifar100_icp.py [--data ./data] [--epochs 100] [--method adam] [--compile]
    python examples/cifar100_icp.py --fake-data --epochs 2    # no download: FakeData of the same shape

Data: torchvision's ``CIFAR100`` (downloaded into ``--data`` when absent and online) with the ICP
trainer's augmentation: a random 24 x 24 crop (0.78 of the side) resized back to 32 x 32,
RandAugment (2 operations, magnitude 9), normalised with CIFAR-100's channel statistics. Model:
ResNet-20 (3 stages of 3 basic blocks, widths 16-32-64; ``--width`` scales it). Training as the
ICP trainer's config: AdamW with learning rate 3e-4 and no weight decay, batch 32, 100 epochs,
gradient norm clipped at 5; refinement with ``--steps 5`` Adam steps of size ``--step-size``
(default: the learning rate, as that trainer passes it), features of ``layer1..layer3`` aligned
with MSE and cosine layer weights, ``--warmup 0.25`` of the epochs (``int(rate * epochs)`` whole
epochs) with the task loss only, then ``alpha = cos(pi/2 * (epoch - warmup) / (epochs - warmup))``
per epoch (``--schedule step`` moves it every step instead).

On CUDA: bf16 autocast and channels_last (``--amp off``, ``--channels-last off`` turn them off),
``--compile`` for ``torch.compile``. Prints per-epoch test accuracy, losses and time per step,
and, from ``torch.profiler`` over a few steps of the first epoch that refines, the share of the
step that fastsd's ops (the fused input update, the feature loss and its backward) take, and the
share of the whole refinement (K forward and input-gradient passes of the model plus the
updates, run by ``fastsd.ICPRefiner``).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402

import fastsd.recipes  # noqa: E402

REFINEMENT = "fastsd.ICPRefiner (K model passes + fused updates)"


def icp_augmentation():
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(int(32 * 0.78)), T.Resize(32), T.RandAugment(num_ops=2, magnitude=9),
                      T.ToTensor(), T.Normalize(C.CIFAR100_MEAN, C.CIFAR100_STD)])


def main(argv=None) -> dict:
    p = C.parser(__doc__, epochs=100, batch_size=32, lr=3e-4, width=16)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--method", choices=["adam", "ademamix", "sgd"], default="adam", help="the refiner's update")
    p.add_argument("--steps", type=int, default=5, help="refinement steps K")
    p.add_argument("--step-size", type=float, default=None, help="the refiner's step size (default: --lr)")
    p.add_argument("--warmup", type=float, default=0.25, help="fraction of the epochs with the task loss only")
    p.add_argument("--schedule", choices=["epoch", "step"], default="epoch")
    p.add_argument("--unweighted", action="store_true", help="all layers weighted 1 (the trainer's weighted_feats=False)")
    p.add_argument("--clip", type=float, default=5.0, help="gradient norm clipping (0: none)")
    args = p.parse_args(argv)

    env = C.setup(args)
    train_set, test_set = C.datasets(args, icp_augmentation())
    train_loader, test_loader = C.loaders(args, train_set, test_set, env)
    model = C.prepare_model(args, C.resnet20(args.width), env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup_epochs = C.warmup_epochs(args.warmup, args.epochs)
    recipe = fastsd.recipes.ICPDistillation(
        model, [model.layer1, model.layer2, model.layer3], steps=args.steps,
        step_size=args.lr if args.step_size is None else args.step_size, method=args.method,
        warmup=warmup_epochs / args.epochs, layer_weights=None if args.unweighted else "cosine",
        schedule=args.schedule, epochs=args.epochs if args.schedule == "epoch" else None)
    print(recipe, flush=True)
    if args.profile_steps > 0:  # label the refinement for the profile (the distiller calls recipe.refiner)
        recipe.distiller.refiner = C.Labelled(recipe.refiner, REFINEMENT)

    def step(x, y, epoch, progress):
        return recipe(x, y, progress)  # dict(loss, task, feature, alpha, logits, output)

    def clip():
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)

    # profile the first epoch that refines: per epoch, the one after the warm-up; per step, the one
    # in which the warm-up ends
    first_refining = warmup_epochs + (1 if args.schedule == "epoch" else 0)
    return C.train(args, "cifar100_icp", model, train_loader, test_loader, env, step, optimizer,
                   logged=("loss", "task", "feature", "alpha"), regions=(REFINEMENT,), before_step=clip,
                   profile_epoch=first_refining)


if __name__ == "__main__":
    main()
