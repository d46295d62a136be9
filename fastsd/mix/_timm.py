"""timm's ``Mixup`` and ``FastCollateMixup`` (timm 1.0.31, timm/data/mixup.py) on fastsd's fused mix op.

The draws are timm's: numpy's global legacy generator, the same calls with the same dtypes in the
same order (per-element or per-batch switch, Beta lambdas and ``prob`` draws, then one box per
mixed CutMix row in row order: ``rand_bbox``, or ``rand_bbox_minmax`` with ``cutmix_minmax``; the
per-row box draws replayed from a read-ahead of the generator, :mod:`._numpy_rng`). The images are
then one pass of :func:`fastsd.mix.mix` with partner ``flip(0)``, where timm loops over rows in
Python, and the targets timm's ``mixup_target``: a seed gives bit-identical images, targets and
numpy state afterwards.

As timm, ``Mixup`` mixes ``x`` in place and returns it (only the mixed pixels move: a CutMix row's
box, a MixUp row whole); an ``x`` that requires grad or is not contiguous is mixed out of place
into a new tensor instead. Bad arguments raise ValueError or TypeError naming them where timm
asserts.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .. import _validate as V
from ._numpy_rng import RawWords, consumes_word
from . import _rows

MODES = ("batch", "pair", "elem")
COLLATE_MODES = MODES + ("half",)


def one_hot(x: torch.Tensor, num_classes: int, on_value: float = 1.0, off_value: float = 0.0) -> torch.Tensor:
    """timm's ``one_hot``: float32 ``[B, num_classes]`` filled with off_value, on_value at x."""
    x = x.long().view(-1, 1)
    return torch.full((x.size()[0], num_classes), off_value, device=x.device).scatter_(1, x, on_value)


def check_targets(fn: str, target: torch.Tensor, num_classes: int, multi_label: bool = False) -> None:
    """Class-index targets: integer ``[B]`` in [0, num_classes) (fastsd._validate.class_indices)."""
    if multi_label:
        return
    V.tensor(fn, "target", target, ndim=1, what="[B] of class indices")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must hold integer class indices, got {target.dtype}")
    V.class_indices(fn, "target", target, num_classes)


def smoothed_targets(target: torch.Tensor, num_classes: int, smoothing: float = 0.0,
                     multi_label: bool = False) -> torch.Tensor:
    """timm's targets before mixing: smoothed one-hot ``[B, num_classes]`` (float32), or for
    ``multi_label`` the dense targets smoothed towards 0.5."""
    if multi_label:
        if target.ndim != 2 or target.shape[1] != num_classes:
            raise ValueError(f"fastsd.mix.mixup_target: multi-label mixup expects dense targets shaped (batch, "
                             f"num_classes={num_classes}), got {tuple(target.shape)}")
        return target.float() * (1.0 - smoothing) + 0.5 * smoothing
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    return one_hot(target, num_classes, on_value=on_value, off_value=off_value)


def mixup_target(target: torch.Tensor, num_classes: int, lam=1.0, smoothing: float = 0.0,
                 multi_label: bool = False, partner: Optional[torch.Tensor] = None,
                 check: bool = True) -> torch.Tensor:
    """timm's ``mixup_target``: ``y * lam + y[partner] * (1 - lam)`` with y the smoothed one-hot
    targets (multi-label: dense targets smoothed towards 0.5); ``lam`` a number or a ``[B, 1]``
    tensor; partner ``flip(0)`` when None. ``check=False``: the caller ran :func:`check_targets`."""
    if check:
        check_targets("fastsd.mix.mixup_target", target, num_classes, multi_label)
    return _mix_smoothed(smoothed_targets(target, num_classes, smoothing, multi_label), lam, partner)


def _mix_smoothed(y1: torch.Tensor, lam, partner: Optional[torch.Tensor] = None) -> torch.Tensor:
    y2 = y1.flip(0) if partner is None else y1[partner]
    return y1 * lam + y2 * (1.0 - lam)


# --- timm's draws ---------------------------------------------------------------------------------

# NumPy 1's scalar promotion: 1 - np.float32(x) is a float64 scalar (NEP 50 made it float32 in NumPy 2).
_REST_OF_FLOAT32_IS_FLOAT64 = (1 - np.float32(0.5)).dtype == np.float64


def rand_bbox_lengths(img_shape, lam):
    """The cut sizes of timm's ``rand_bbox`` (``lam`` a numpy float32 array, or one number).

    timm draws a box per element with numpy scalars (``lam_batch[i]``): in NumPy 1, ``1 - np.float32``
    is a float64 scalar, and every later step with it; in NumPy 2 it stays float32. An array keeps
    its dtype in both, so in NumPy 1 a float32 array is widened first (exactly)."""
    if isinstance(lam, np.ndarray) and _REST_OF_FLOAT32_IS_FLOAT64:
        lam = lam.astype(np.float64)
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = img_h * ratio, img_w * ratio
    if isinstance(cut_h, np.ndarray):
        return cut_h.astype(np.int64), cut_w.astype(np.int64)
    return int(cut_h), int(cut_w)


def _clip_box(img_shape, cy, cx, cut_h, cut_w, lower=np.maximum, upper=np.minimum):
    """timm's ``np.clip`` of the box edges to the image (on integers: a max and a min, without
    np.clip's per-call overhead; ``max`` and ``min`` for one box of Python ints)."""
    img_h, img_w = img_shape[-2:]
    yl = upper(lower(cy - cut_h // 2, 0), img_h)
    yh = upper(lower(cy + (cut_h + 1) // 2, 0), img_h)
    xl = upper(lower(cx - cut_w // 2, 0), img_w)
    xh = upper(lower(cx + (cut_w + 1) // 2, 0), img_w)
    return yl, yh, xl, xh


def draw_boxes(img_shape, lam: np.ndarray, minmax: Optional[Sequence[float]]) -> np.ndarray:
    """One box per entry of ``lam`` (float32 per element, float64 per batch), as timm's consecutive ``rand_bbox`` /
    ``rand_bbox_minmax`` calls draw them: ``[n, 4]`` int64 (y0, y1, x0, x1)."""
    img_h, img_w = img_shape[-2:]
    n = len(lam)
    if n == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if minmax is not None:
        h_lo, h_hi = int(img_h * minmax[0]), int(img_h * minmax[1])
        w_lo, w_hi = int(img_w * minmax[0]), int(img_w * minmax[1])
        # the corner draws have cut < size, so they always read the generator
        words = RawWords(n * (2 + consumes_word(h_lo, h_hi) + consumes_word(w_lo, w_hi)))
        out = []
        for _ in range(n):
            cut_h = words.randint(h_lo, h_hi)
            cut_w = words.randint(w_lo, w_hi)
            yl = words.randint(0, img_h - cut_h + 1)
            xl = words.randint(0, img_w - cut_w + 1)
            out.append((yl, yl + cut_h, xl, xl + cut_w))
        return np.asarray(out, dtype=np.int64).reshape(n, 4)
    if n == 1:  # one box (the per-batch modes): timm's own scalar calls, in Python integers (a numpy
        # operation on a 1-element array costs about 1 us, and the vectorised path takes 20 of them)
        cut_h, cut_w = rand_bbox_lengths(img_shape, lam[0])
        cy = np.random.randint(0, img_h)  # 4 us a call, where one call of size 2 costs 12
        cx = np.random.randint(0, img_w)
        return np.array([_clip_box(img_shape, cy, cx, cut_h, cut_w, max, min)], dtype=np.int64)
    cut_h, cut_w = rand_bbox_lengths(img_shape, lam)
    if img_h == img_w:  # equal bounds: the scalar calls' values are one vectorised call's
        centres = np.random.randint(0, img_h, size=2 * n)
    else:
        words = RawWords(n * (consumes_word(0, img_h) + consumes_word(0, img_w)))
        centres = np.asarray([words.randint(0, img_h if k % 2 == 0 else img_w) for k in range(2 * n)],
                             dtype=np.int64)
    return np.stack(_clip_box(img_shape, centres[0::2], centres[1::2], cut_h, cut_w), axis=1)


def corrected_lam(img_shape, boxes: np.ndarray, lam, correct_lam: bool, minmax):
    """timm's ``cutmix_bbox_and_lam`` lambda: ``1 - box_area / (H * W)`` (float64) when corrected."""
    if correct_lam or minmax is not None:
        area = (boxes[..., 1] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 2])
        return 1.0 - area / float(img_shape[-2] * img_shape[-1])
    return lam


class Mixup:
    """timm's ``Mixup`` (same arguments, defaults and attributes; ``mixup_enabled`` may be set by the
    training loop), one fused pass per batch. ``mixup_fn(x, target) -> (x_mixed, target_mixed)``.

    Rows are paired with ``flip(0)`` (row i with B - 1 - i). 'batch': one lambda and one box for
    the batch; 'pair': per pair of rows; 'elem': per row. CutMix rows: ``x[i]`` with its box from
    the partner, lambda corrected to ``1 - box_area / (H * W)`` (``correct_lam``, always with
    ``cutmix_minmax``); MixUp rows: ``x[i] * lam + x[partner] * (1 - lam)``. Targets:
    ``y * lam + y[partner] * (1 - lam)``, y smoothed one-hot (:func:`mixup_target`).
    x is mixed in place and returned, as by timm (out of place where it requires grad).
    """

    modes = MODES

    def __init__(self, mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode="batch", correct_lam=True, label_smoothing=0.1, num_classes=1000, multi_label=False):
        fn = f"fastsd.mix.{type(self).__name__}"
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
                raise ValueError(f"{fn}: {name} must be a number >= 0, got {value!r}")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        if self.cutmix_minmax is not None:
            if len(self.cutmix_minmax) != 2 or not 0 <= cutmix_minmax[0] < cutmix_minmax[1] <= 1:
                raise ValueError(f"{fn}: cutmix_minmax must be (min, max) with 0 <= min < max <= 1, "
                                 f"got {cutmix_minmax!r}")
            self.cutmix_alpha = 1.0  # as timm: minmax forces CutMix on
        self.mix_prob = V.unit_interval(fn, "prob", prob)
        self.switch_prob = V.unit_interval(fn, "switch_prob", switch_prob)
        self.label_smoothing = V.unit_interval(fn, "label_smoothing", label_smoothing)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"{fn}: num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.multi_label = multi_label
        if mode not in self.modes:
            raise ValueError(f"{fn}: mode must be one of {self.modes}, got {mode!r}")
        self.mode = mode
        self.correct_lam = correct_lam
        self.mixup_enabled = True

    # timm's draws, call for call -----------------------------------------------------------------

    def _params_per_elem(self, batch_size):
        lam = np.ones(batch_size, dtype=np.float32)
        use_cutmix = np.zeros(batch_size, dtype=bool)
        if self.mixup_enabled:
            if self.mixup_alpha > 0.0 and self.cutmix_alpha > 0.0:
                use_cutmix = np.random.rand(batch_size) < self.switch_prob
                lam_mix = np.where(
                    use_cutmix,
                    np.random.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch_size),
                    np.random.beta(self.mixup_alpha, self.mixup_alpha, size=batch_size))
            elif self.mixup_alpha > 0.0:
                lam_mix = np.random.beta(self.mixup_alpha, self.mixup_alpha, size=batch_size)
            elif self.cutmix_alpha > 0.0:
                use_cutmix = np.ones(batch_size, dtype=bool)
                lam_mix = np.random.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch_size)
            else:
                raise ValueError(self._nothing_enabled())
            lam = np.where(np.random.rand(batch_size) < self.mix_prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    def _params_per_batch(self):
        lam = 1.0
        use_cutmix = False
        if self.mixup_enabled and np.random.rand() < self.mix_prob:
            if self.mixup_alpha > 0.0 and self.cutmix_alpha > 0.0:
                use_cutmix = np.random.rand() < self.switch_prob
                lam_mix = np.random.beta(self.cutmix_alpha, self.cutmix_alpha) if use_cutmix else \
                    np.random.beta(self.mixup_alpha, self.mixup_alpha)
            elif self.mixup_alpha > 0.0:
                lam_mix = np.random.beta(self.mixup_alpha, self.mixup_alpha)
            elif self.cutmix_alpha > 0.0:
                use_cutmix = True
                lam_mix = np.random.beta(self.cutmix_alpha, self.cutmix_alpha)
            else:
                raise ValueError(self._nothing_enabled())
            lam = float(lam_mix)
        return lam, use_cutmix

    def _nothing_enabled(self):
        return (f"fastsd.mix.{type(self).__name__}: one of mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax "
                f"must be set while mixup_enabled")

    def _elem_rows(self, n, img_shape):
        """timm's per-element draws for n rows: (lam float32 [n], use_box [n], boxes [n, 4]); rows
        left unmixed get an empty box."""
        lam, use_cutmix = self._params_per_elem(n)
        mixed = lam != 1.0
        cut = mixed & use_cutmix
        boxes = np.zeros((n, 4), dtype=np.int64)
        if cut.any():
            boxes[cut] = draw_boxes(img_shape, lam[cut], self.cutmix_minmax)
            lam[cut] = corrected_lam(img_shape, boxes[cut], lam[cut], self.correct_lam, self.cutmix_minmax)
        return lam, cut | ~mixed, boxes

    def _batch_rows(self, img_shape, box_when_unmixed=False):
        """timm's per-batch draws: (lam, use_cutmix, box [4] or None)."""
        lam, use_cutmix = self._params_per_batch()
        box = None
        if use_cutmix and (lam != 1.0 or box_when_unmixed):
            box = draw_boxes(img_shape, np.asarray([lam]), self.cutmix_minmax)[0]
            lam = float(corrected_lam(img_shape, box, lam, self.correct_lam, self.cutmix_minmax))
        return lam, use_cutmix, box

    def mix_params(self, img_shape, batch_size: int):
        """This step's draws as the fused op's arguments: ``(lam, use_box, boxes, lam_target)``, numpy
        ``[B]`` float32 or float64, ``[B]`` bool, ``[B, 4]`` int64, and the target's lambda (a
        float for 'batch', else the float32 ``[B]`` array); None for a 'batch' step left unmixed."""
        if self.mode in ("elem", "half"):
            n = batch_size // 2 if self.mode == "half" else batch_size
            lam, use_box, boxes = self._elem_rows(n, img_shape)
            if self.mode == "half":  # the second half is the mixing source only
                lam = np.concatenate((lam, np.ones(n, dtype=lam.dtype)))
                use_box = np.concatenate((use_box, np.ones(n, dtype=bool)))
                boxes = np.concatenate((boxes, np.zeros((n, 4), dtype=np.int64)))
            return lam, use_box, boxes, lam
        if self.mode == "pair":
            lam, use_box, boxes = self._elem_rows(batch_size // 2, img_shape)
            lam = np.concatenate((lam, lam[::-1]))
            return lam, np.concatenate((use_box, use_box[::-1])), np.concatenate((boxes, boxes[::-1])), lam
        lam, use_cutmix, box = self._batch_rows(img_shape, box_when_unmixed=self._collating)
        if lam == 1.0:
            return None
        boxes = np.zeros((batch_size, 4), dtype=np.int64)
        if use_cutmix:
            boxes[:] = box
        return np.full(batch_size, lam), np.full(batch_size, use_cutmix), boxes, lam

    _collating = False

    def _mix(self, x: torch.Tensor):
        """Mix x (in place where it can be, as timm) -> ``(out, lam_target, rows)``: the targets'
        lambda (a float, or the float32 ``[B]`` array) and the draws on x's device
        (:class:`fastsd.mix._rows.Rows`), None for a step left unmixed."""
        B = x.shape[0]
        params = self.mix_params(x.shape, B)
        if params is None:
            return x, 1.0, None
        lam, use_box, boxes, lam_target = params
        image_lam = lam
        if x.dtype == torch.float64 and lam.dtype == np.float32 and _REST_OF_FLOAT32_IS_FLOAT64:
            # timm blends a row with ``x[i] * lam + x[j] * (1 - lam)``, lam a numpy float32 scalar:
            # in NumPy 1, 1 - lam is a float64 scalar (exact), which a float64 image takes as it is
            # (in NumPy 2 a float32, rounded, as the op's 1 - lam in lam's dtype); lam itself is the
            # same number in float64
            image_lam = lam.astype(np.float64)
        r = _rows.rows(x.device, "flip", boxes, image_lam, use_box, lam)
        return _rows.mix_images(x, r, inplace=True), lam_target, r

    def _mix_target(self, target: torch.Tensor, lam, r, lam_dtype: torch.dtype, lam_device) -> torch.Tensor:
        """timm's ``mixup_target`` of this step, with a per-row lambda as timm passes it: a
        ``lam_dtype`` tensor on ``lam_device``. By the fused op (:func:`fastsd.mix._rows.mix_rows`, the
        rows of the images' pass) where its C++ kernels run (the CPU; CUDA on the cuda backend,
        :func:`fastsd.mix._rows.fuses_on`), its weights are timm's (a float lambda, the per-batch modes,
        or a float32 one) and the smoothed targets allow it (:func:`fastsd.mix._rows.fuses`); else
        (Triton's backend; float16 x in 'elem'/'pair', where timm rounds lambda to it; targets that need
        a gradient) in ATen ops, as timm."""
        y = smoothed_targets(target, self.num_classes, self.label_smoothing, self.multi_label)
        if (isinstance(lam, float) or lam_dtype == torch.float32) and y.dtype in (torch.float32, torch.float64) \
                and _rows.fuses(r, y):
            return _rows.mix_rows(y, r)
        if not isinstance(lam, float):  # timm: torch.tensor(lam, device, dtype), a copy the host waits on;
            # the rows' float32 lambdas are those values on x's device already, and a cast rounds as it does
            lam = r.lam.to(device=lam_device, dtype=lam_dtype).unsqueeze(1)
        return _mix_smoothed(y, lam)

    def _check_batch(self, fn, batch_size):
        if batch_size % 2:
            raise ValueError(f"{fn}: the batch size must be even (rows are mixed with their mirror row "
                             f"in mode {self.mode!r}), got {batch_size}")

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = "fastsd.mix.Mixup"
        V.tensor(fn, "x", x, ndim=4, what="[B, C, H, W]")
        V.tensor(fn, "target", target)
        self._check_batch(fn, len(x))
        if len(target) != len(x):
            raise ValueError(f"{fn}: target must have B={len(x)} rows, got {len(target)}")
        check_targets(fn, target, self.num_classes, self.multi_label)  # before x is mixed in place
        out, lam, r = self._mix(x)
        return out, self._mix_target(target, lam, r, x.dtype, x.device)


class FastCollateMixup(Mixup):
    """timm's ``FastCollateMixup``: a collate function over ``[(uint8 CHW image as numpy array or
    tensor, target), ...]`` returning ``(uint8 [B, C, H, W], mixed targets)``; MixUp rows are
    ``round_half_even(float32(x[i]) * lam + float32(x[partner]) * (1 - lam))``. Mode 'half' mixes
    the first half of the batch with the second and returns the first half."""

    modes = COLLATE_MODES
    _collating = True

    def __call__(self, batch, _=None):
        fn = "fastsd.mix.FastCollateMixup"
        batch_size = len(batch)
        self._check_batch(fn, batch_size)
        images = [b[0] if isinstance(b[0], torch.Tensor) else torch.from_numpy(np.asarray(b[0])) for b in batch]
        if any(img.dtype != torch.uint8 for img in images):
            raise TypeError(f"{fn}: batch images must be uint8 (as timm's fast collate expects)")
        x = torch.stack(images)
        target = torch.utils.data.default_collate([b[1] for b in batch])
        check_targets(fn, target, self.num_classes, self.multi_label)
        out, lam, r = self._mix(x)
        target = self._mix_target(target, lam, r, torch.float32, None)  # timm: torch.tensor(lam), float32 on the CPU
        if self.mode == "half":
            return out[:batch_size // 2], target[:batch_size // 2]
        return out, target
