"""CutMix and MixUp as the trainers' libraries compute them, in one fused pass (SPEC section 6).

* :func:`mix` - the op: per row a CutMix box from its partner, or a MixUp blend
  ``x * lam + x[partner] * (1 - lam)``; :func:`mix_` the same in place for an involution partner
  (only the mixed pixels move). Backends: Triton (CUDA), C++ (CPU) and the PyTorch reference
  (any device);
* drop-ins with the libraries' signatures, draws and return conventions, bit-identical outputs:
  :class:`Mixup`, :class:`FastCollateMixup` (timm), :class:`CutMix`, :class:`MixUp`
  (torchvision.transforms.v2), :class:`RandomCutMixV2` (kornia: its own subclass, whose pixel
  work is the fused op).

Neither timm, torchvision nor kornia is imported (torchvision only to re-wrap a tv_tensors.Image
that was passed in; kornia when ``RandomCutMixV2`` is first used).
"""
from ._timm import FastCollateMixup, Mixup, mixup_target, one_hot
from ._torchvision import CutMix, MixUp
from .op import mix, mix_

__all__ = ["CutMix", "FastCollateMixup", "MixUp", "Mixup", "RandomCutMixV2", "mix", "mix_", "mixup_target",
           "one_hot"]


def __getattr__(name):
    if name == "RandomCutMixV2":  # a subclass of kornia's: built (kornia imported) on first use
        from ._kornia import _random_cutmix_v2

        return _random_cutmix_v2()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
