"""fastsd: fast, verified GPU and CPU kernels for self-distillation training in PyTorch.

The contract of every public function is ../shared/SPEC.md; each docstring repeats the formula.
Importing fastsd is light: Triton, torchvision and the compiled extension load on first use.
"""
from ._backend import BackendUnavailableError, use_backend
from ._ext import empty_cache
from .pairing import box_mask, default_patch_size, intra_class_pairs, intra_class_patch_swap, patch_swap_mask
from .patch_swap import patch_swap
from .losses import feature_alignment_loss, kd_loss, pair_kd_loss
from .icp import ICPDistiller, ICPRefiner
from . import data, nn  # noqa: E402  (fastsd.nn modules, fastsd.data.ClassPairSampler)
from . import recipes  # noqa: E402  (fastsd.recipes.PatchSwapDistillation, ICPDistillation)
from . import mix  # noqa: E402  (fastsd.mix.Mixup, CutMix, MixUp: timm's and torchvision's, fused)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ICPDistiller",
    "ICPRefiner",
    "box_mask",
    "default_patch_size",
    "empty_cache",
    "feature_alignment_loss",
    "kd_loss",
    "pair_kd_loss",
    "intra_class_pairs",
    "intra_class_patch_swap",
    "patch_swap",
    "patch_swap_mask",
    "use_backend",
]
