"""Pure-PyTorch reference of every fastsd op: the fallback backend and the test oracle.

Written for clarity, not speed: each function is the formula of ../shared/SPEC.md as directly as
PyTorch says it.
"""
from .losses import cosine_similarity, feature_alignment_loss, kd_loss, layer_weights, pair_kd_loss
from .mix import box_mask, mix, mix_backward, mix_weights
from .patch_swap import cell_index, inverse_partner, patch_swap, patch_swap_backward, upsample_mask

__all__ = ["cell_index", "inverse_partner", "patch_swap", "patch_swap_backward", "upsample_mask",
           "box_mask", "mix", "mix_backward", "mix_weights",
           "cosine_similarity", "feature_alignment_loss", "kd_loss", "layer_weights", "pair_kd_loss"]
