"""CutMix and MixUp as the trainers' libraries compute them, in one fused pass (SPEC section 6).

* :func:`mix` - the op: per row a CutMix box from its partner, or a MixUp blend
  ``x * lam + x[partner] * (1 - lam)``; :func:`mix_` the same in place for an involution partner
  (only the mixed pixels move). Backends: Triton (CUDA), C++ (CPU) and the PyTorch reference
  (any device);
* drop-ins with the libraries' signatures, draws and return conventions, bit-identical outputs:
  :class:`Mixup`, :class:`FastCollateMixup` (timm), :class:`CutMix`, :class:`MixUp`
  (torchvision.transforms.v2).

Neither timm, torchvision nor kornia is imported (torchvision only to re-wrap a tv_tensors.Image
that was passed in). kornia's RandomCutMixV2 has no drop-in yet.
"""
from ._timm import FastCollateMixup, Mixup, mixup_target, one_hot
from ._torchvision import CutMix, MixUp
from .op import mix, mix_

__all__ = ["CutMix", "FastCollateMixup", "MixUp", "Mixup", "mix", "mix_", "mixup_target", "one_hot"]
