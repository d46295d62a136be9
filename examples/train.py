"""Train a small ResNet on real images with plain cross-entropy or a fastsd self-distillation recipe.

    python examples/train.py --method ce|patchswap|icp [--epochs 15] [--seed 0] [--device cpu]

Data: scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 grey
8 x 8 images of the digits 0-9, from the UCI optical-recognition set). It ships inside the
scikit-learn wheel, so the example runs offline with no download, and it is small enough to train
on a laptop CPU in a minute or two. Images are scaled to [0, 1], upsampled to 16 x 16 (bilinear)
so the default patch grid is 8 x 8 cells of 2 x 2 px, and standardised with the training set's
mean and std. A fixed stratified split keeps 30 % (540 images) as the held-out test set; ``--seed``
changes the weights' initialisation, the batch order, the pairing and the swap masks, not the
split.

The training loop is the same for the three methods: only the line that computes the loss differs
(see ``loss_fn`` below).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

try:
    import fastsd
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fastsd
import fastsd.recipes


# --- data --------------------------------------------------------------------------------------


def digits(size: int = 16, test_fraction: float = 0.3):
    """(x_train, y_train, x_test, y_test): float32 [N, 1, size, size] standardised, int64 labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit("examples/train.py needs scikit-learn for its data set: pip install scikit-learn") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           stratify=y.numpy(), random_state=0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[train_idx], (x_test - mean) / std, y[test_idx]


# --- model -------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8 (three stages of one basic block, widths 16-32-64) for small grey images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- training ----------------------------------------------------------------------------------


def evaluate(model, x, y, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(y), batch):
            correct += int((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
    model.train()
    return correct / len(y)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["ce", "patchswap", "icp"], default="ce")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (cuda when available)")
    p.add_argument("--size", type=int, default=16, help="side the 8 x 8 digits are upsampled to")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="append this run's summary as one JSON line to this file")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (e.g. in logs)")
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits(args.size))
    model = SmallResNet().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                    steps_per_epoch=steps_per_epoch)

    # The only method-specific lines: build the recipe once, call it for the loss.
    if args.method == "patchswap":
        recipe = fastsd.recipes.PatchSwapDistillation(model)
    elif args.method == "icp":
        recipe = fastsd.recipes.ICPDistillation(model, ["layer1", "layer2", "layer3"])

    def loss_fn(x, y, progress):
        if args.method == "ce":
            return F.cross_entropy(model(x), y)
        return recipe(x, y, progress)["loss"]

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train), device=device)
        batches = range(steps_per_epoch)
        bar = None
        if tqdm is not None and not args.no_progress:
            bar = batches = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, file=sys.stderr)
        total, seen = 0.0, 0
        for b in batches:
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            x, y = x_train[idx], y_train[idx]
            progress = (epoch + b / steps_per_epoch) / args.epochs
            loss = loss_fn(x, y, progress)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            if bar is not None:
                bar.set_postfix(loss=f"{total / seen:.4f}")
        if bar is not None:
            bar.close()
        acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "loss": total / seen, "test_acc": acc})
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {total / seen:.4f}  held-out accuracy {100 * acc:6.2f}%",
              flush=True)
    elapsed = time.perf_counter() - start
    summary = {"method": args.method, "seed": args.seed, "epochs": args.epochs, "device": str(device),
               "test_acc": history[-1]["test_acc"], "seconds": round(elapsed, 1), "history": history}
    print(f"{args.method} seed {args.seed}: held-out accuracy {100 * summary['test_acc']:.2f}% "
          f"({len(y_test)} images) after {args.epochs} epochs, {elapsed:.0f} s on {device}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
