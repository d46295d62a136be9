"""Train a small ResNet on real images with plain cross-entropy or a fastsd self-distillation recipe.

    python examples/train.py --method ce|patchswap|icp [--epochs 15] [--seed 0] [--device cpu] [--threads 1]
        [--train-fraction 1] [--label-noise 0] [--pairing batch|sampler]
        [--ratio R] [--patch-size P] [--prob P] [--temperature T] [--kd-weight W]

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

Reproducible: the same command gives the same accuracy on the same machine and torch build. It
runs with one torch CPU thread unless ``--threads`` says otherwise (the thread count changes the
order of floating-point sums, and so the trained weights: 1 and 2 threads give different
accuracies), and every random draw comes from ``--seed``. ``--train-fraction`` and
``--label-noise`` make the settings where self-distillation is meant to help (a small training set,
noisy labels); ``examples/sweep.py`` runs them, and the patch-swap arguments, over 5 seeds.
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
import fastsd.data
import fastsd.recipes


# --- data --------------------------------------------------------------------------------------


def digits(size: int = 16, test_fraction: float = 0.3, train_fraction: float = 1.0, label_noise: float = 0.0):
    """(x_train, y_train, x_test, y_test): float32 [N, 1, size, size] standardised, int64 labels.

    ``train_fraction`` < 1 keeps a stratified subset of the training split (a small-data setting);
    ``label_noise`` > 0 replaces that fraction of the training labels by another class, drawn
    uniformly (symmetric noise; the test labels stay clean). Both are fixed by ``random_state=0``,
    like the split: they are part of the data set, the same for every method and every seed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit("examples/train.py needs scikit-learn for its data set: pip install scikit-learn") from exc
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"digits: train_fraction must be in (0, 1], got {train_fraction!r}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"digits: label_noise must be in [0, 1), got {label_noise!r}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           stratify=y.numpy(), random_state=0)
    if train_fraction < 1.0:
        train_idx, _ = train_test_split(train_idx, train_size=train_fraction, stratify=y[train_idx].numpy(),
                                        random_state=0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x_train, x_test, y_train = x[train_idx], x[test_idx], y[train_idx].clone()
    if label_noise > 0:
        gen = torch.Generator().manual_seed(0)
        flip = torch.randperm(len(y_train), generator=gen)[:round(label_noise * len(y_train))]
        # another class, uniformly: add 1..K-1 modulo K
        y_train[flip] = (y_train[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y[test_idx]


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


# The patch-swap recipe's arguments the command line (and examples/sweep.py) can set; None = the
# recipe's default.
RECIPE_ARGS = ("ratio", "patch_size", "prob", "temperature", "kd_weight")


def make_reproducible(seed: int, threads: int = 1, device=None) -> None:
    """Same command, same accuracy: a fixed torch CPU thread count (the order of the reductions
    inside convolutions and matmuls depends on it, so 1 and 2 threads give different weights after
    a few hundred steps), one seed for every random draw (init, batch order, pairing, swap masks:
    all from torch's global generator or generators seeded from ``seed``), and deterministic cuDNN
    algorithms on a GPU."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if device is not None and torch.device(device).type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def train(method: str = "ce", *, epochs: int = 15, batch_size: int = 64, lr: float = 0.05, seed: int = 0,
          device="cpu", size: int = 16, threads: int = 1, train_fraction: float = 1.0, label_noise: float = 0.0,
          pairing: str = "batch", recipe_args: dict = None, eval_every: int = 1, progress_bar: bool = False,
          log=print) -> dict:
    """Train one model and return its summary (``test_acc`` is the held-out accuracy after the
    last epoch). ``pairing`` (patch swap only): ``"batch"`` pairs same-class images inside each
    shuffled batch (``fastsd.intra_class_pairs``, the recipe's default); ``"sampler"`` builds each
    batch as ``batch_size / 2`` anchors and one same-class partner each from the whole training set
    (``fastsd.data.ClassPairSampler``, the CS-KD protocol), with the pairing ``i <-> i + n``. Both
    take the same number of steps of ``batch_size`` images per epoch (``ceil(N / batch_size)``; the
    sampler's epoch is cut there, so each epoch half of the images serve as anchors). The held-out
    set is scored every ``eval_every`` epochs and after the last (``eval_every=0``: after the last
    only; scoring does not touch the training's random draws)."""
    if method not in ("ce", "patchswap", "icp"):
        raise ValueError(f"method must be ce, patchswap or icp, got {method!r}")
    if pairing not in ("batch", "sampler"):
        raise ValueError(f"pairing must be 'batch' or 'sampler', got {pairing!r}")
    recipe_args = {k: v for k, v in (recipe_args or {}).items() if v is not None}
    if recipe_args and method != "patchswap":
        raise ValueError(f"recipe arguments {sorted(recipe_args)} apply to --method patchswap only")
    if pairing == "sampler" and method != "patchswap":
        raise ValueError("pairing='sampler' applies to --method patchswap only")
    device = torch.device(device)
    make_reproducible(seed, threads, device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits(size, train_fraction=train_fraction,
                                                                       label_noise=label_noise))
    model = SmallResNet().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch)

    # The only method-specific lines: build the recipe once, call it for the loss.
    if method == "patchswap":
        recipe = fastsd.recipes.PatchSwapDistillation(model, **recipe_args)
    elif method == "icp":
        recipe = fastsd.recipes.ICPDistillation(model, ["layer1", "layer2", "layer3"])

    def loss_fn(x, y, progress, partner=None):
        if method == "ce":
            return F.cross_entropy(model(x), y)
        if partner is not None:
            return recipe(x, y, progress, partner=partner)["loss"]
        return recipe(x, y, progress)["loss"]

    sampler = None
    if pairing == "sampler":
        sampler = fastsd.data.ClassPairSampler(y_train.cpu(), batch_size, seed=seed)
    tqdm = None
    if progress_bar:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
    history = []
    start = time.perf_counter()
    for epoch in range(epochs):
        if sampler is None:
            order = torch.randperm(len(y_train), device=device)
            batches = (order[b * batch_size:(b + 1) * batch_size] for b in range(steps_per_epoch))
        else:
            sampler.set_epoch(epoch)
            batches = (torch.tensor(b, device=device) for b, _ in zip(sampler, range(steps_per_epoch)))
        bar = None
        if tqdm is not None:
            bar = batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                                 file=sys.stderr)
        total, seen = 0.0, 0
        for b, idx in enumerate(batches):
            x, y = x_train[idx], y_train[idx]
            progress = (epoch + b / steps_per_epoch) / epochs
            partner = None if sampler is None else fastsd.data.ClassPairSampler.partner(len(idx), device)
            loss = loss_fn(x, y, progress, partner)
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
        acc = None
        if epoch + 1 == epochs or (eval_every and (epoch + 1) % eval_every == 0):
            acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "loss": total / seen, "test_acc": acc})
        if log:
            scored = "" if acc is None else f"  held-out accuracy {100 * acc:6.2f}%"
            log(f"epoch {epoch + 1:3d}/{epochs}  loss {total / seen:.4f}{scored}")
    elapsed = time.perf_counter() - start
    return {"method": method, "seed": seed, "epochs": epochs, "device": str(device), "threads": threads,
            "train_fraction": train_fraction, "label_noise": label_noise, "pairing": pairing,
            "recipe_args": recipe_args, "train_images": len(y_train), "test_images": len(y_test),
            "test_acc": history[-1]["test_acc"], "seconds": round(elapsed, 1), "history": history}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["ce", "patchswap", "icp"], default="ce")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (cuda when available)")
    p.add_argument("--size", type=int, default=16, help="side the 8 x 8 digits are upsampled to")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the accuracy depends on it, see make_reproducible)")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="keep this stratified fraction of the training split (default 1)")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="flip this fraction of the training labels to another class (default 0)")
    p.add_argument("--pairing", choices=["batch", "sampler"], default="batch",
                   help="patchswap: same-class pairs inside each batch, or ClassPairSampler anchor + partner batches")
    p.add_argument("--ratio", type=float, default=None, help="patchswap: share of cells swapped (recipe default)")
    p.add_argument("--patch-size", type=int, default=None, help="patchswap: cell side in px (recipe default)")
    p.add_argument("--prob", type=float, default=None, help="patchswap: probability a pair swaps (recipe default)")
    p.add_argument("--temperature", type=float, default=None, help="patchswap: KD temperature (recipe default)")
    p.add_argument("--kd-weight", type=float, default=None, help="patchswap: KD weight (recipe default)")
    p.add_argument("--eval-every", type=int, default=1,
                   help="score the held-out set every N epochs and after the last (0: after the last only)")
    p.add_argument("--json", default=None, help="append this run's summary as one JSON line to this file")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (e.g. in logs)")
    args = p.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    recipe_args = {k: getattr(args, k) for k in RECIPE_ARGS}
    summary = train(args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    device=device, size=args.size, threads=args.threads, train_fraction=args.train_fraction,
                    label_noise=args.label_noise, pairing=args.pairing, recipe_args=recipe_args,
                    eval_every=args.eval_every, progress_bar=not args.no_progress, log=lambda line: print(line, flush=True))
    print(f"{args.method} seed {args.seed}: held-out accuracy {100 * summary['test_acc']:.2f}% "
          f"({summary['test_images']} images) after {args.epochs} epochs, {summary['seconds']:.0f} s on {device}, "
          f"{args.threads} thread(s)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
