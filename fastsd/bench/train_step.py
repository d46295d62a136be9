"""End-to-end training-step benchmarks (issue 5): a whole step, fastsd against the way public code does it.

Rows (op ``train_step``):

* ``patchswap r18 b128``: one patch-swap self-distillation step on a CIFAR ResNet-18 (torchvision
  resnet18 with a 3x3 stride-1 stem, no max-pool, 10 classes), batch 128, 32 x 32, SGD with
  momentum: pairing, masks, swap, forward, loss, backward, optimiser step.
  ``fastsd`` is :class:`fastsd.recipes.PatchSwapDistillation`; the ``loop`` baseline pairs on the
  host with a loop over classes, draws each pair's cells with its own ``randperm``, swaps with a
  per-pair Python loop (:func:`fastsd.bench.patch_swap.loop_patch_swap`) and computes the loss with
  eager multi-op PyTorch (softmax, gather, compare, ``kl_div``).
* ``patchswap swap b128`` and ``patchswap loss b128``: the two parts that differ, alone.
* ``icp r18 bN K5``: one ICP step (task forward, 5 Adam refinement steps, target forward,
  layer-wise MSE, backward, optimiser step): :class:`fastsd.recipes.ICPDistillation` against the
  plain PyTorch loop (:func:`reference_icp_step`). Batch 128, or 16 with ``--quick`` on a CPU
  (each step is several ResNet-18 passes).

The model dominates these steps; the speedup is the swap, loss and refinement overhead removed.
``python -m fastsd.bench.train_step`` prints what share of a step each part takes, for both.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .core import Bench, _sync
from .patch_swap import loop_patch_swap

CLASSES = 10
LAYERS = ("layer1", "layer2", "layer3", "layer4")


def cifar_resnet18(num_classes: int = CLASSES) -> nn.Module:
    """torchvision's resnet18 with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _setup(batch: int, device, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = cifar_resnet18().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)
    return model, opt, x, y


# --- the way public code does patch-swap self-distillation ---------------------------------------


def loop_pairs(labels: torch.Tensor) -> torch.Tensor:
    """Random same-class pairs, drawn on the host with a loop over classes (singletons pair with
    themselves)."""
    partner = list(range(labels.shape[0]))
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), device=labels.device)].tolist()
        for a, b in zip(members[0::2], members[1::2]):
            partner[a], partner[b] = b, a
    return torch.tensor(partner, device=labels.device)


def loop_masks(partner: torch.Tensor, grid, ratio: float = 0.5) -> torch.Tensor:
    """One ``randperm`` of the cells per pair, written into both members' masks."""
    B, (gh, gw) = partner.shape[0], grid
    k = round(ratio * gh * gw)
    mask = torch.zeros(B, gh * gw, dtype=torch.bool, device=partner.device)
    for i, j in enumerate(partner.tolist()):
        if j <= i:
            continue
        cells = torch.randperm(gh * gw, device=partner.device)[:k]
        mask[i, cells] = True
        mask[j, cells] = True
    return mask.view(B, gh, gw)


def eager_pair_kd_loss(logits, labels, partner, temperature: float = 4.0, kd_weight: float = 1.0):
    """``fastsd.pair_kd_loss`` in eager multi-op PyTorch: CE plus T^2 KL from the more confident
    member of each pair (its temperature-1 probability of the true class; ties: lower index)."""
    B = logits.shape[0]
    idx = torch.arange(B, device=logits.device)
    ce = F.cross_entropy(logits, labels)
    with torch.no_grad():
        p_true = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        p_other = p_true[partner]
        teacher = (p_true > p_other) | ((p_true == p_other) & (idx < partner))
        student = (partner != idx) & ~teacher
    target = F.softmax(logits[partner].detach() / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="none").sum(1)
    kd = (kl * student).sum() / student.sum().clamp(min=1) * temperature ** 2
    return ce + kd_weight * kd


def _timed(times: Dict[str, float], name: str, device, t0: float) -> float:
    _sync(device)
    t = time.perf_counter()
    times[name] = times.get(name, 0.0) + t - t0
    return t


def _timed_update(opt, loss, times: Dict[str, float], device, t: float) -> torch.Tensor:
    """The end of every timed step: backward and optimiser step, each timed; the detached loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t = _timed(times, "backward", device, t)
    opt.step()
    _timed(times, "optimiser step", device, t)
    return loss.detach()


def _timed_patchswap_step(model, opt, x, y, swap, loss_fn, times):
    """One step, each part timed into ``times``: ``swap(x, y) -> (swapped, partner)``, the forward,
    ``loss_fn(logits, y, partner)``, the backward and the optimiser step."""
    device = x.device
    times = {} if times is None else times
    t = time.perf_counter()
    swapped, partner = swap(x, y)
    t = _timed(times, "swap (pair, mask, swap)", device, t)
    logits = model(swapped)
    t = _timed(times, "forward", device, t)
    loss = loss_fn(logits, y, partner)
    t = _timed(times, "loss", device, t)
    return _timed_update(opt, loss, times, device, t)


def loop_patchswap_step(model, opt, x, y, grid=(8, 8), times=None):
    def swap(x, y):
        partner = loop_pairs(y)
        return loop_patch_swap(x, partner, loop_masks(partner, grid)), partner

    return _timed_patchswap_step(model, opt, x, y, swap, eager_pair_kd_loss, times)


def fastsd_patchswap_step(model, opt, x, y, grid=(8, 8), times=None):
    """What :class:`fastsd.recipes.PatchSwapDistillation` runs, op by op so each part can be timed."""
    from ..losses import pair_kd_loss
    from ..pairing import intra_class_pairs, patch_swap_mask
    from ..patch_swap import patch_swap

    def swap(x, y):
        partner = intra_class_pairs(y)
        return patch_swap(x, partner, patch_swap_mask(partner, grid)), partner

    return _timed_patchswap_step(model, opt, x, y, swap, pair_kd_loss, times)


def recipe_patchswap_step(recipe, opt, x, y):
    loss = recipe(x, y)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


# --- ICP: the plain PyTorch loop -------------------------------------------------------------------


class FeatureHooks:
    """Forward hooks that keep the last output of each named module (registered once)."""

    def __init__(self, model: nn.Module, layers):
        modules = dict(model.named_modules())
        self.out: Dict[str, torch.Tensor] = {}
        for name in layers:
            modules[name].register_forward_hook(lambda mod, inp, out, name=name: self.out.__setitem__(name, out))
        self.layers = list(layers)

    def take(self) -> List[torch.Tensor]:
        return [self.out[n] for n in self.layers]


def reference_icp_step(model, opt, hooks: FeatureHooks, x, y, progress=0.8, steps=5, step_size=2e-3,
                       warmup=0.25, betas=(0.9, 0.999), eps=1e-8, times=None):
    """One ICP step as a plain PyTorch trainer writes it: separate tensor ops for Adam on the input,
    an eager forward/backward per refinement step, per-layer ``F.mse_loss``."""
    device = x.device
    times = {} if times is None else times
    t = time.perf_counter()
    logits = model(x)
    student = hooks.take()
    task = F.cross_entropy(logits, y)
    t = _timed(times, "task forward", device, t)
    model.eval()
    xr = x.detach().clone()
    m, v = torch.zeros_like(xr), torch.zeros_like(xr)
    for k in range(1, steps + 1):
        xr.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat = m / (1 - betas[0] ** k)
        v_hat = v / (1 - betas[1] ** k)
        xr = (xr - step_size * m_hat / (v_hat.sqrt() + eps)).detach()
    model.train()
    t = _timed(times, "refine (K steps)", device, t)
    with torch.no_grad():
        model(xr)
    targets = hooks.take()
    t = _timed(times, "target forward", device, t)
    L = len(student)
    weights = [1.0] if L == 1 else [math.cos(i * math.pi / (4 * (L - 1))) for i in range(L)]
    feature = sum(w * F.mse_loss(s, tg) for w, s, tg in zip(weights, student, targets))
    alpha = math.cos(math.pi / 2 * (progress - warmup) / (1 - warmup)) if progress > warmup else 1.0
    loss = alpha * task + (1 - alpha) * feature
    t = _timed(times, "feature loss", device, t)
    return _timed_update(opt, loss, times, device, t)


class _TimedRefiner:
    """Stands in for a distiller's refiner and adds its time to ``times``."""

    def __init__(self, refiner, times: Dict[str, float], device):
        self.refiner, self.times, self.device = refiner, times, device

    def __call__(self, x, y):
        t = time.perf_counter()
        out = self.refiner(x, y)
        _timed(self.times, "refine (K steps)", self.device, t)
        return out


def recipe_icp_step(recipe, opt, x, y, progress=0.8, times=None):
    device = x.device
    timed = times is not None
    times = {} if times is None else times
    if timed:  # time the refinement inside the recipe's call too
        recipe.distiller.refiner = _TimedRefiner(recipe.refiner, times, device)
    try:
        t = time.perf_counter()
        loss = recipe(x, y, progress)["loss"]
        t = _timed(times, "recipe call", device, t)
    finally:
        recipe.distiller.refiner = recipe.refiner
    if timed:
        times["task + target forward, feature loss"] = times.pop("recipe call") - times["refine (K steps)"]
    return _timed_update(opt, loss, times, device, t)


# --- the bench rows ----------------------------------------------------------------------------


def icp_batch(device, quick: bool) -> int:
    return 16 if quick and torch.device(device).type == "cpu" else 128


def benches(device="cpu", dtype=torch.float32, quick=True) -> List[Bench]:
    from ..losses import pair_kd_loss
    from ..pairing import intra_class_pairs, patch_swap_mask
    from ..patch_swap import patch_swap
    from ..recipes import ICPDistillation, PatchSwapDistillation

    device = torch.device(device)

    def ps_setup():
        model, opt, x, y = _setup(128, device, dtype)
        return model, opt, x, y, PatchSwapDistillation(model, patch_size=4, ratio=0.5)  # as loop_masks, like for like

    def swap_setup():
        return _setup_inputs(128, device, dtype)

    def fastsd_swap(i):
        x, y = i
        partner = intra_class_pairs(y)
        return patch_swap(x, partner, patch_swap_mask(partner, (8, 8)))

    def loop_swap(i):
        x, y = i
        partner = loop_pairs(y)
        return loop_patch_swap(x, partner, loop_masks(partner, (8, 8)))

    def loss_setup():
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(128, CLASSES, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        y = torch.randint(0, CLASSES, (128,), generator=gen).to(device)
        return logits, y, intra_class_pairs(y)

    def loss_and_grad(fn):
        def run(i):
            logits, y, partner = i
            loss = fn(logits, y, partner)
            (g,) = torch.autograd.grad(loss, logits)
            return loss.detach(), g

        return run

    def loss_reference(i):
        logits, y, partner = i
        return loss_and_grad(eager_pair_kd_loss)((logits.detach().double().requires_grad_(True), y, partner))

    b_icp = icp_batch(device, quick)

    def icp_setup():
        model, opt, x, y = _setup(b_icp, device, dtype)
        hooks = FeatureHooks(model, LAYERS)
        return model, opt, x, y, hooks, ICPDistillation(model, list(LAYERS), steps=5, step_size=2e-3, method="adam")

    return [
        Bench(op="train_step", case="patchswap r18 b128", setup=ps_setup,
              backends={"fastsd": lambda i: recipe_patchswap_step(i[4], i[1], i[2], i[3])},
              baselines={"loop": lambda i: loop_patchswap_step(i[0], i[1], i[2], i[3])},
              speedup_vs=("loop",), targets={"loop": 1.3}, target_rows=("fastsd",), target_source="issue 5",
              eager="loop", note="CIFAR ResNet-18, SGD momentum; swap + forward + loss + backward + step"),
        Bench(op="train_step", case="patchswap swap b128", setup=swap_setup,
              backends={"fastsd": fastsd_swap}, baselines={"loop": loop_swap},
              speedup_vs=("loop",), eager="loop", note="pairing + masks + swap, 128 x 3 x 32 x 32, 8 x 8 grid"),
        Bench(op="train_step", case="patchswap loss b128", setup=loss_setup,
              backends={"fastsd": loss_and_grad(pair_kd_loss)},
              baselines={"eager": loss_and_grad(eager_pair_kd_loss)},
              reference=loss_reference, speedup_vs=("eager",), eager="eager",
              note="pair KD loss and its gradient, K = 10"),
        Bench(op="train_step", case=f"icp r18 b{b_icp} K5", setup=icp_setup,
              backends={"fastsd": lambda i: recipe_icp_step(i[5], i[1], i[2], i[3])},
              baselines={"loop": lambda i: reference_icp_step(i[0], i[1], i[4], i[2], i[3])},
              speedup_vs=("loop",), eager="loop",
              note="task forward, 5 Adam refinement steps, target forward, MSE, backward, step"),
    ]


def _setup_inputs(batch, device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)
    return x, y


# --- share of the step each part takes -----------------------------------------------------------


def breakdown(steps: Dict[str, object], repeats: int, device) -> Dict[str, Dict[str, float]]:
    """Median seconds per part of each ``steps[name](times)`` over ``repeats`` steps, after one
    warm-up step each. The implementations take turns (A, B, A, B, ...), so a change in the
    machine's load during the run reaches all of them alike."""
    for step in steps.values():
        step({})
    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times: Dict[str, float] = {}
            _sync(device)
            t0 = time.perf_counter()
            step(times)
            _sync(device)
            times["total"] = time.perf_counter() - t0
            runs[name].append(times)
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def _print_breakdown(title: str, parts: Dict[str, Dict[str, float]], differ=()) -> None:
    names = [k for k in next(iter(parts.values())) if k != "total"]
    for impl in parts.values():
        names += [k for k in impl if k != "total" and k not in names]
    print(f"\n{title}")
    head = f"{'part':<38}" + "".join(f"{impl:>22}" for impl in parts)
    print(head)
    print("-" * len(head))
    for n in names + ["total"]:
        cells = []
        for impl in parts.values():
            if n in impl:
                cells.append(f"{impl[n] * 1e3:10.1f} ms {100 * impl[n] / impl['total']:5.1f}%")
            else:
                cells.append(f"{'-':>22}")
        print(f"{n:<38}" + "".join(f"{c:>22}" for c in cells))
    impls = list(parts)
    if len(impls) == 2:
        a, b = parts[impls[0]]["total"], parts[impls[1]]["total"]
        print(f"step speedup {impls[1]} vs {impls[0]}: {a / b:.3f}x (medians of the totals)")
        if differ:
            # the model's parts run the same code in both: their difference is noise
            da = sum(parts[impls[0]][k] for k in differ)
            db = sum(parts[impls[1]][k] for k in differ)
            print(f"parts that differ ({', '.join(differ)}): {da * 1e3:.1f} ms vs {db * 1e3:.1f} ms; with the "
                  f"other parts taken from {impls[0]}: {a / (a - da + db):.3f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.train_step",
                                description="Share of a training step each part takes, fastsd vs the public-code baseline.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--icp-batch", type=int, default=None, help="ICP batch (default 16 on CPU, 128 on CUDA)")
    p.add_argument("--only", choices=["patchswap", "icp"], default=None, help="run one of the two steps")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} timed steps each after one warm-up, implementations taking turns; medians per part")

    if args.only != "icp":
        _patchswap_breakdown(device, args.repeats)
    if args.only != "patchswap":
        _icp_breakdown(device, args.repeats, args.icp_batch)
    return 0


def _patchswap_breakdown(device, repeats):
    model, opt, x, y = _setup(128, device, torch.float32)
    parts = breakdown({"loop (public code)": lambda t: loop_patchswap_step(model, opt, x, y, times=t),
                       "fastsd": lambda t: fastsd_patchswap_step(model, opt, x, y, times=t)}, repeats, device)
    _print_breakdown("patch-swap self-distillation step, CIFAR ResNet-18, batch 128", parts,
                     differ=("swap (pair, mask, swap)", "loss"))


def _icp_breakdown(device, repeats, batch=None):
    from ..recipes import ICPDistillation

    b = batch or icp_batch(device, quick=True)
    model, opt, x, y = _setup(b, device, torch.float32)
    hooks = FeatureHooks(model, LAYERS)
    recipe = ICPDistillation(model, list(LAYERS), steps=5, step_size=2e-3, method="adam")
    parts = breakdown({"loop (plain PyTorch)": lambda t: reference_icp_step(model, opt, hooks, x, y, times=t),
                       "fastsd": lambda t: recipe_icp_step(recipe, opt, x, y, times=t)}, repeats, device)
    _print_breakdown(f"ICP step (K = 5, Adam), CIFAR ResNet-18, batch {b}", parts)


if __name__ == "__main__":
    raise SystemExit(main())
