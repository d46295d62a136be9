"""Training recipes: the few lines a plain PyTorch training loop adds for self-distillation.

Each recipe wraps a classifier ``nn.Module`` and is called once per batch::

    sd = fastsd.recipes.PatchSwapDistillation(model)        # or ICPDistillation(model, layers)
    for x, y in loader:
        loss = sd(x, y, progress)["loss"]                    # was: F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()

``sd(x, y, progress=None) -> dict(loss=..., ...)``; ``progress`` is the fraction of training done,
in [0, 1] (only ICP's schedule reads it). The recipes own no optimiser and no parameters, so any
optimiser, LR schedule, AMP scaler or gradient clipping stays where it was.

Distributed training: pass the ``DistributedDataParallel`` wrapper as ``model``. The recipe's
gradient-carrying forward goes through the wrapper, so gradients are all-reduced as usual; ICP's
refinement loop (input gradients only) runs on the wrapped module (``model.module``), so it never
touches the DDP reducer. ``nn.DataParallel`` over several GPUs is refused by
:class:`ICPDistillation` (its replicas run the hooked layers in other threads; use DDP);
:class:`PatchSwapDistillation` takes it.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

from . import _validate as V
from .icp import ICPDistiller, ICPRefiner, _task_loss, unwrap
from .losses import TEACHERS, pair_kd_loss
from .pairing import default_patch_size, intra_class_pairs, patch_swap_mask
from .patch_swap import patch_swap

__all__ = ["ICPDistillation", "PatchSwapDistillation", "unwrap"]


def _check_model(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def _check_progress(fn: str, progress) -> Optional[float]:
    if progress is None:
        return None
    return V.unit_interval(fn, "progress", progress)


class PatchSwapDistillation:
    """Intra-class patch swap self-distillation (ICPS) as one call per batch.

    ``out = recipe(x, y)`` does, in order:

    1. ``partner = fastsd.intra_class_pairs(y)``: random same-class pairs (singletons when a class
       has an odd count in the batch);
    2. ``mask = fastsd.patch_swap_mask(partner, grid, ratio, prob)`` with ``grid = ceil(H / ph),
       ceil(W / pw)`` for ``(ph, pw) = patch_size`` (default :func:`fastsd.default_patch_size`);
    3. ``x_swapped = fastsd.patch_swap(x, partner, mask)``; ``logits = model(x_swapped)``;
    4. ``loss = fastsd.pair_kd_loss(logits, y, partner, temperature, kd_weight, ce_weight, teacher)``:
       cross-entropy on every row plus ``T^2``-scaled KL from the more confident member of each pair
       to the other.

    Returns ``dict(loss, logits, partner, mask)``; ``loss`` is the scalar to backpropagate.

    Args:
        model: any classifier ``nn.Module`` mapping ``[B, C, H, W]`` to logits ``[B, K]`` (or its
            DDP / DataParallel wrapper).
        temperature, kd_weight, teacher: as :func:`fastsd.pair_kd_loss`.
        patch_size, ratio, prob: as :func:`fastsd.intra_class_patch_swap`, except that ``ratio``
            defaults to 0.2 here (the op's default is 0.5): on scikit-learn's digits
            (``examples/sweep.py``, 5 seeds) swapping 20 % of the cells beat swapping half of them
            on the full, the small (15 %) and the noisy-label (20 % flipped) training sets; tune it
            on your own data.
        ce_weight: weight of the cross-entropy term (1).
        generator: a ``torch.Generator`` on x's device for the pairing and the masks (default:
            the global RNG).

    Call ``recipe(x, y, progress=None, partner=None)``: ``progress`` is accepted for a signature
    shared with :class:`ICPDistillation` and not used. ``partner`` replaces the random pairing,
    e.g. ``fastsd.data.ClassPairSampler.partner(len(x), x.device)`` for batches from that sampler
    (anchor i with partner i + n); it must be an involution with same-class pairs.
    """

    def __init__(self, model: nn.Module, temperature: float = 4.0, kd_weight: float = 1.0, patch_size=None,
                 ratio: float = 0.2, prob: float = 1.0, teacher: str = "confident", *, ce_weight: float = 1.0,
                 generator: Optional[torch.Generator] = None):
        fn = "fastsd.recipes.PatchSwapDistillation"
        _check_model(fn, model)
        self.model = model
        self.temperature = V.positive_float(fn, "temperature", temperature)
        for name, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{fn}: {name} must be a number, got {value!r}")
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        self.patch_size = None if patch_size is None else V.positive_int_pair(fn, "patch_size", patch_size)
        self.ratio = V.unit_interval(fn, "ratio", ratio)
        self.prob = V.unit_interval(fn, "prob", prob)
        if teacher not in TEACHERS:
            raise ValueError(f"{fn}: teacher must be one of {TEACHERS}, got {teacher!r}")
        self.teacher = teacher
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def __repr__(self) -> str:
        return (f"PatchSwapDistillation(temperature={self.temperature}, kd_weight={self.kd_weight}, "
                f"patch_size={self.patch_size}, ratio={self.ratio}, prob={self.prob}, teacher={self.teacher!r})")

    def grid(self, height: int, width: int):
        """The swap grid ``(gh, gw)`` used for ``height x width`` images."""
        ph, pw = self.patch_size or default_patch_size(height, width)
        if ph > height or pw > width:
            raise ValueError(f"fastsd.recipes.PatchSwapDistillation: patch_size ({ph}, {pw}) must not exceed the "
                             f"image size ({height}, {width})")
        return -(-height // ph), -(-width // pw)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, progress: Optional[float] = None, *,
                 partner: Optional[torch.Tensor] = None) -> dict:
        fn = "fastsd.recipes.PatchSwapDistillation"
        V.tensor(fn, "x", x, ndim=4, what="[B, C, H, W]")
        V.tensor(fn, "y", y, ndim=1, dtypes=V.INT_DTYPES, what="[B] of class indices")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{fn}: y must have length B={x.shape[0]} (x.shape[0]), got {y.shape[0]}")
        _check_progress(fn, progress)
        if partner is None:
            partner = intra_class_pairs(y, generator=self.generator)
        mask = patch_swap_mask(partner, self.grid(*x.shape[-2:]), ratio=self.ratio, prob=self.prob,
                               generator=self.generator)
        logits = self.model(patch_swap(x, partner, mask))
        loss = pair_kd_loss(logits, y, partner, temperature=self.temperature, kd_weight=self.kd_weight,
                            ce_weight=self.ce_weight, teacher=self.teacher)
        return {"loss": loss, "logits": logits, "partner": partner, "mask": mask}


class ICPDistillation:
    """Iterative constructive perturbation (ICP) self-distillation as one call per batch.

    ``out = recipe(x, y, progress)`` is :class:`fastsd.ICPDistiller` with an
    :class:`fastsd.ICPRefiner`: the task loss is ``loss_fn(model(x), y)`` (default cross-entropy);
    once the scheduled progress passes ``warmup``, x is refined ``steps`` times down that loss
    (eval mode, fresh optimiser state), the refined input's features at ``layers`` become detached
    targets, and ``loss = alpha * task + (1 - alpha) * feature_alignment_loss(features(x), targets)``
    with ``alpha = cos(pi/2 * (p - warmup) / (1 - warmup))`` (1 during warm-up).

    Returns ``dict(loss, task, feature, alpha, logits, output)`` (``logits``/``output``: x's, for
    accuracy and logging).

    Args:
        model: any ``nn.Module`` classifier, or its ``DistributedDataParallel`` wrapper
            (``nn.DataParallel`` over several GPUs is refused: ValueError). The forward of x
            (the one that carries gradient) and the target forward go through ``model``; the
            refinement loop runs on the unwrapped module (:func:`unwrap`), so DDP's reducer never
            sees its forward/backward passes (they differentiate the input only).
        layers: the modules whose outputs are aligned: names relative to the unwrapped module
            (e.g. ``["layer1", "layer2", "layer3", "layer4"]`` for a torchvision ResNet; names
            that include the wrapper's ``module.`` prefix work too), the submodules themselves, or
            a mix.
        steps, step_size, method: the refiner's (see :class:`fastsd.ICPRefiner`). The paper's
            trainer passes its model learning rate as the step size (3e-4 in its config);
            ``2e-3`` is the default of its ``get_ifgsm``, which that trainer does not use.
        warmup: fraction of training with the task loss only.
        kind, layer_weights: the feature loss (see :func:`fastsd.feature_alignment_loss`).
        clamp, cuda_graph: passed to :class:`fastsd.ICPRefiner`.
        loss_fn, logits_fn: the task loss on the model's whole output and the logits in it (see
            :class:`fastsd.ICPDistiller`); the refiner refines down the same loss.
        schedule, epochs: ``"epoch"`` (default, the paper's: alpha changes once per epoch; with
            ``epochs`` any per-step progress is read at its epoch's start) or ``"step"``.
        total_steps: when given, a call with ``progress=None`` uses ``calls_so_far / total_steps``
            (the recipe counts its calls); without it ``progress`` is required. With
            ``schedule="epoch"`` it needs ``epochs`` too.
    """

    def __init__(self, model: nn.Module, layers, steps: int = 5, step_size: float = 2e-3,
                 method: str = "adam", warmup: float = 0.25, *, kind: str = "mse", layer_weights="cosine",
                 clamp=None, cuda_graph: str = "auto", total_steps: Optional[int] = None,
                 loss_fn=None, logits_fn=None, schedule: str = "epoch", epochs: Optional[int] = None):
        fn = "fastsd.recipes.ICPDistillation"
        _check_model(fn, model)
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral)
                                        or total_steps < 1):
            raise ValueError(f"{fn}: total_steps must be None or an int >= 1, got {total_steps!r}")
        if total_steps is not None and schedule == "epoch" and epochs is None:
            raise ValueError(f"{fn}: total_steps= with schedule='epoch' needs epochs= (the progress of a call is "
                             f"read at its epoch's start); or pass schedule='step'")
        self.model = model
        self.module = unwrap(model)
        task_loss = _task_loss(fn, loss_fn, logits_fn)
        self.refiner = ICPRefiner(self.module, steps=steps, step_size=step_size, method=method, clamp=clamp,
                                  cuda_graph=cuda_graph, loss_fn=task_loss)
        self.distiller = ICPDistiller(model, _names_in_wrapper(fn, model, self.module, layers), refiner=self.refiner,
                                      kind=kind, layer_weights=layer_weights, warmup=warmup, loss_fn=task_loss,
                                      logits_fn=logits_fn, schedule=schedule, epochs=epochs)
        self.layers = tuple(_inner_name(model, self.module, name) for name in self.distiller.layers)
        self.total_steps = total_steps
        self.calls = 0

    def __repr__(self) -> str:
        return (f"ICPDistillation(layers={list(self.layers)}, steps={self.refiner.steps}, "
                f"step_size={self.refiner.step_size}, method={self.refiner.method!r}, "
                f"warmup={self.distiller.warmup}, kind={self.distiller.kind!r}, "
                f"schedule={self.distiller.schedule!r}, epochs={self.distiller.epochs})")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, progress: Optional[float] = None) -> dict:
        fn = "fastsd.recipes.ICPDistillation"
        progress = _check_progress(fn, progress)
        if self.total_steps is not None:  # the recipe keeps the schedule: it counts its calls
            if progress is None:
                progress = min(1.0, self.calls / self.total_steps)
            self.calls += 1
        elif progress is None:
            raise ValueError(f"{fn}: progress (the fraction of training done, in [0, 1]) is required unless "
                             f"the recipe was built with total_steps=")
        # Without total_steps nothing reads the count, and none is kept: under torch.compile a count
        # read on every call is a value the graph is specialised on, so the second step compiled the
        # whole step again (tests/test_recipes.py compiles with error_on_recompile).
        return self.distiller(x, y, progress)


def _names_in_wrapper(fn: str, model: nn.Module, module: nn.Module, layers):
    """``layers`` (names in the unwrapped module, or already in the wrapper; or submodules, which
    :class:`fastsd.ICPDistiller` resolves) as layers of ``model``."""
    if model is module:
        return list(layers)
    inner = dict(module.named_modules())
    outer_name = {id(m): name for name, m in model.named_modules()}
    outer = dict(model.named_modules())
    names = []
    for layer in layers:
        if not isinstance(layer, str):  # a submodule (or a wrong type): the distiller resolves or refuses it
            names.append(layer)
        elif isinstance(layer, str) and layer in inner and layer != "":
            names.append(outer_name[id(inner[layer])])
        elif isinstance(layer, str) and layer in outer:
            names.append(layer)
        else:
            valid = [n for n in inner if n]
            raise ValueError(f"{fn}: unknown layers [{layer!r}] in layers; valid names: {valid}")
    return names


def _inner_name(model: nn.Module, module: nn.Module, name: str) -> str:
    """A layer's name in ``model`` as a name in the unwrapped ``module`` (itself when not inside it)."""
    if model is module:
        return name
    inner_name = {id(m): n for n, m in module.named_modules()}
    return inner_name.get(id(dict(model.named_modules())[name]), name)
