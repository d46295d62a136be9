"""Bad input across the public API (issue 7): one table, each case checked for the exact exception
type, a message that names the argument, and inputs left untouched (values and version counters);
and NaN / Inf in data propagating exactly as in the reference, for every op and backend that runs here.

The per-op tables that came first (test_losses.BAD, test_patch_swap.BAD_PATCH_SWAP and BAD_HELPERS)
stay where they are; :data:`CATALOGUE` is this table plus theirs, and every case in it is run here
with the checks above (theirs are also re-run for the exact type and untouched inputs, which their
own tests do not check). The ICP and sampler tests that are inline in test_icp / test_pairing are
not repeated; the cases here are ones none of those cover.
"""
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastsd
import test_losses
import test_patch_swap
from fastsd import reference as R
from fastsd.data import ClassPairSampler
from fastsd.icp import icp_update_, new_state
from fastsd.reference import icp as R_icp

from conftest import CPU_BACKENDS


Z = torch.randn(4, 5)
Y = torch.tensor([0, 1, 0, 1])
P = torch.tensor([2, 3, 0, 1])
X = torch.randn(4, 3, 8, 8)
M = torch.zeros(4, 2, 2, dtype=torch.bool)
S = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
XR = torch.randn(4, 3, 2, 2)  # a batch for MODEL


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))


MODEL = _model()


def meta(t):
    return t.to("meta")


@dataclass
class Case:
    name: str
    call: Callable
    args: Tuple = ()
    kwargs: dict = field(default_factory=dict)
    exc: type = ValueError
    word: str = ""
    watch: Tuple[Any, ...] = ()  # other inputs to check (e.g. the model a bound object holds)


def C(name, call, *args, exc, word, watch=(), **kwargs):
    return Case(name, call, args, kwargs, exc, word, watch)


class _Forced:
    """Run ``fn`` under ``fastsd.use_backend(name)``."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args, **kwargs):
        with fastsd.use_backend(self.name):
            return self.fn(*args, **kwargs)


REFINER = fastsd.ICPRefiner(MODEL, steps=1)
DISTILLER = fastsd.ICPDistiller(MODEL, ["1"], refiner=REFINER)

BAD = [
    # pair_kd_loss (beyond test_losses.BAD)
    C("pair logits not a tensor", fastsd.pair_kd_loss, Z.tolist(), Y, P, exc=TypeError, word="logits"),
    C("pair logits 3-D", fastsd.pair_kd_loss, Z[None], Y, P, exc=ValueError, word="logits"),
    C("pair no classes", fastsd.pair_kd_loss, Z[:, :0], Y, P, exc=ValueError, word="logits"),
    C("pair labels 2-D", fastsd.pair_kd_loss, Z, Y[None], P, exc=ValueError, word="labels"),
    C("pair labels bool", fastsd.pair_kd_loss, Z, Y.bool(), P, exc=TypeError, word="labels"),
    C("pair labels other device", fastsd.pair_kd_loss, Z, meta(Y), P, exc=ValueError, word="labels"),
    C("pair labels -100 when ignore_index=-1", fastsd.pair_kd_loss, Z, torch.tensor([0, -100, 0, 1]), P,
      ignore_index=-1, exc=ValueError, word="labels"),
    C("pair partner float", fastsd.pair_kd_loss, Z, Y, P.float(), exc=TypeError, word="partner"),
    C("pair partner negative", fastsd.pair_kd_loss, Z, Y, torch.tensor([2, 3, 0, -1]), exc=ValueError, word="partner"),
    C("pair temperature inf", fastsd.pair_kd_loss, Z, Y, P, temperature=math.inf, exc=ValueError, word="temperature"),
    C("pair temperature nan", fastsd.pair_kd_loss, Z, Y, P, temperature=math.nan, exc=ValueError, word="temperature"),
    C("pair temperature bool", fastsd.pair_kd_loss, Z, Y, P, temperature=True, exc=TypeError, word="temperature"),
    C("pair ce_weight str", fastsd.pair_kd_loss, Z, Y, P, ce_weight="1", exc=TypeError, word="ce_weight"),
    C("pair ce_weight inf", fastsd.pair_kd_loss, Z, Y, P, ce_weight=math.inf, exc=TypeError, word="ce_weight"),
    C("pair teacher None", fastsd.pair_kd_loss, Z, Y, P, teacher=None, exc=ValueError, word="teacher"),
    C("pair ignore_index bool", fastsd.pair_kd_loss, Z, Y, P, ignore_index=True, exc=TypeError, word="ignore_index"),
    # kd_loss
    C("kd student not a tensor", fastsd.kd_loss, Z.tolist(), Z, exc=TypeError, word="student_logits"),
    C("kd teacher not a tensor", fastsd.kd_loss, Z, Z.tolist(), exc=TypeError, word="teacher_logits"),
    C("kd student 1-D", fastsd.kd_loss, Z[0], Z[0], exc=ValueError, word="student_logits"),
    C("kd student int", fastsd.kd_loss, Z.long(), Z.long(), exc=TypeError, word="student_logits"),
    C("kd teacher other device", fastsd.kd_loss, Z, meta(Z), exc=ValueError, word="teacher_logits"),
    C("kd no classes", fastsd.kd_loss, Z[:, :0], Z[:, :0], exc=ValueError, word="student_logits"),
    C("kd temperature nan", fastsd.kd_loss, Z, Z, temperature=math.nan, exc=ValueError, word="temperature"),
    C("kd reduction None", fastsd.kd_loss, Z, Z, reduction=None, exc=ValueError, word="reduction"),
    # feature_alignment_loss
    C("feature None", fastsd.feature_alignment_loss, None, None, exc=TypeError, word="student"),
    C("feature layer not a tensor", fastsd.feature_alignment_loss, [S[0], 3], S, exc=TypeError, word="student[1]"),
    C("feature target layer rank 1", fastsd.feature_alignment_loss, S, [S[0], S[1].flatten()], exc=ValueError,
      word="target[1]"),
    C("feature target layer other device", fastsd.feature_alignment_loss, S, [S[0], meta(S[1])], exc=ValueError,
      word="target[1]"),
    C("feature single target dtype", fastsd.feature_alignment_loss, S[0], S[0].double(), exc=TypeError, word="target"),
    C("feature weights tensor", fastsd.feature_alignment_loss, S, S, weights=torch.ones(2), exc=TypeError,
      word="weights"),
    C("feature weights float", fastsd.feature_alignment_loss, S, S, weights=2.0, exc=TypeError, word="weights"),
    C("feature weights inf", fastsd.feature_alignment_loss, S, S, weights=[math.inf, 1.0], exc=TypeError,
      word="weights[0]"),
    C("feature kind None", fastsd.feature_alignment_loss, S, S, kind=None, exc=ValueError, word="kind"),
    # ICPRefiner: construction and call
    C("refiner steps bool", fastsd.ICPRefiner, MODEL, steps=True, exc=TypeError, word="steps"),
    C("refiner step_size str", fastsd.ICPRefiner, MODEL, step_size="x", exc=TypeError, word="step_size"),
    C("refiner method None", fastsd.ICPRefiner, MODEL, method=None, exc=ValueError, word="method"),
    C("refiner betas scalar", fastsd.ICPRefiner, MODEL, betas=0.9, exc=ValueError, word="betas"),
    C("refiner betas negative", fastsd.ICPRefiner, MODEL, betas=(-0.1, 0.9), exc=ValueError, word="betas"),
    C("refiner ademamix betas x4", fastsd.ICPRefiner, MODEL, method="ademamix", betas=(0.9, 0.9, 0.9, 0.9),
      exc=ValueError, word="betas"),
    C("refiner eps nan", fastsd.ICPRefiner, MODEL, eps=math.nan, exc=ValueError, word="eps"),
    C("refiner clamp scalar", fastsd.ICPRefiner, MODEL, clamp=1.0, exc=ValueError, word="clamp"),
    C("refiner clamp str bound", fastsd.ICPRefiner, MODEL, clamp=("a", 1.0), exc=TypeError, word="clamp"),
    C("refiner max_graphs 0", fastsd.ICPRefiner, MODEL, max_graphs=0, exc=ValueError, word="max_graphs"),
    C("refiner ademamix_alpha str", fastsd.ICPRefiner, MODEL, ademamix_alpha="x", exc=TypeError,
      word="ademamix_alpha"),
    C("refiner ademamix_alpha nan", fastsd.ICPRefiner, MODEL, ademamix_alpha=math.nan, exc=ValueError,
      word="ademamix_alpha"),
    C("refine x not a tensor", REFINER, XR.tolist(), Y, exc=TypeError, word="x", watch=(MODEL,)),
    C("refine x 0-D", REFINER, torch.tensor(1.0), Y, exc=ValueError, word="x", watch=(MODEL,)),
    C("refine y other device", REFINER, XR, meta(Y), exc=ValueError, word="y", watch=(MODEL,)),
    C("refine loss_fn returns a float", fastsd.ICPRefiner(MODEL, steps=1, loss_fn=lambda o, t: 1.0), XR, Y,
      exc=ValueError, word="loss_fn", watch=(MODEL,)),
    # ICPDistiller
    C("distiller model str", fastsd.ICPDistiller, "model", ["1"], exc=TypeError, word="model"),
    C("distiller layers not names", fastsd.ICPDistiller, MODEL, [1], exc=TypeError, word="layers"),
    C("distiller layer ''", fastsd.ICPDistiller, MODEL, [""], exc=ValueError, word="layers"),
    C("distiller layer_weights name", fastsd.ICPDistiller, MODEL, ["1"], layer_weights="linear", exc=ValueError,
      word="layer_weights"),
    C("distiller layer_weights not numbers", fastsd.ICPDistiller, MODEL, ["1"], layer_weights=["a"], exc=TypeError,
      word="layer_weights"),
    C("distiller refiner int", fastsd.ICPDistiller, MODEL, ["1"], refiner=3, exc=TypeError, word="refiner"),
    C("distiller warmup str", fastsd.ICPDistiller, MODEL, ["1"], warmup="x", exc=TypeError, word="warmup"),
    C("distiller layer of another model", fastsd.ICPDistiller, MODEL, [nn.Linear(12, 5)], exc=ValueError,
      word="layers"),
    C("distiller layer the model itself", fastsd.ICPDistiller, MODEL, ["1", MODEL], exc=ValueError, word="layers"),
    C("distiller loss_fn int", fastsd.ICPDistiller, MODEL, ["1"], loss_fn=1, exc=TypeError, word="loss_fn"),
    C("distiller logits_fn str", fastsd.ICPDistiller, MODEL, ["1"], logits_fn="logits", exc=TypeError,
      word="logits_fn"),
    C("distiller schedule batch", fastsd.ICPDistiller, MODEL, ["1"], schedule="batch", exc=ValueError,
      word="schedule"),
    C("distiller epochs 0", fastsd.ICPDistiller, MODEL, ["1"], epochs=0, exc=ValueError, word="epochs"),
    C("distiller epochs bool", fastsd.ICPDistiller, MODEL, ["1"], epochs=True, exc=ValueError, word="epochs"),
    C("distiller epochs with step schedule", fastsd.ICPDistiller, MODEL, ["1"], schedule="step", epochs=10,
      exc=ValueError, word="epochs"),
    C("recipe icp total_steps without epochs", fastsd.recipes.ICPDistillation, MODEL, ["1"], total_steps=10,
      exc=ValueError, word="epochs"),
    C("distill progress nan", DISTILLER, XR, Y, math.nan, exc=ValueError, word="progress", watch=(MODEL,)),
    C("distill x not a tensor", DISTILLER, XR.tolist(), Y, 0.5, exc=TypeError, word="x", watch=(MODEL,)),
    C("distill y length", DISTILLER, XR, Y[:3], 0.5, exc=ValueError, word="y", watch=(MODEL,)),
    # patch_swap and friends (beyond test_patch_swap's tables)
    C("swap mask other device", fastsd.patch_swap, X, P, meta(M), exc=ValueError, word="mask"),
    C("swap grid wider than image", fastsd.patch_swap, X, P, torch.zeros(4, 2, 9, dtype=torch.bool), exc=ValueError,
      word="gw"),
    C("swap mask int64", fastsd.patch_swap, X, P, M.long(), exc=TypeError, word="mask"),
    C("pairs labels list", fastsd.intra_class_pairs, [0, 1], exc=TypeError, word="labels"),
    C("mask ratio str", fastsd.patch_swap_mask, P, (2, 2), ratio="0.5", exc=TypeError, word="ratio"),
    C("mask grid bool", fastsd.patch_swap_mask, P, (True, 2), exc=TypeError, word="grid"),
    C("mask partner 2-D", fastsd.patch_swap_mask, P[None], (2, 2), exc=ValueError, word="partner"),
    C("mask partner out of range", fastsd.patch_swap_mask, torch.tensor([5, 0, 1, 2]), (2, 2), exc=ValueError,
      word="partner"),
    C("mask generator str", fastsd.patch_swap_mask, P, (2, 2), generator="g", exc=TypeError, word="generator"),
    C("box area scalar", fastsd.box_mask, P, (8, 8), area=0.3, exc=TypeError, word="area"),
    C("box size negative", fastsd.box_mask, P, (-1, 8), exc=ValueError, word="size"),
    C("box prob negative", fastsd.box_mask, P, (8, 8), prob=-1, exc=ValueError, word="prob"),
    C("box partner out of range", fastsd.box_mask, torch.tensor([5, 0, 1, 2]), (4, 4), exc=ValueError,
      word="partner"),
    C("swap-all x 3-D", fastsd.intra_class_patch_swap, X[0], Y, exc=ValueError, word="x"),
    C("swap-all labels float", fastsd.intra_class_patch_swap, X, Y.float(), exc=TypeError, word="labels"),
    C("swap-all labels other device", fastsd.intra_class_patch_swap, X, meta(Y), exc=ValueError, word="labels"),
    C("swap-all prob 2", fastsd.intra_class_patch_swap, X, Y, prob=2, exc=ValueError, word="prob"),
    # ClassPairSampler (beyond test_pairing's)
    C("sampler labels 2-D", ClassPairSampler, [[0, 1]], 2, exc=ValueError, word="labels"),
    C("sampler labels bool", ClassPairSampler, [True, False], 2, exc=ValueError, word="labels"),
    C("sampler labels strings", ClassPairSampler, ["a", "b"], 2, exc=ValueError, word="labels"),
    C("sampler batch_size bool", ClassPairSampler, [0, 1], True, exc=ValueError, word="batch_size"),
    C("sampler batch_size float", ClassPairSampler, [0, 1], 4.0, exc=ValueError, word="batch_size"),
    C("sampler rank negative", ClassPairSampler, [0, 1], 2, num_replicas=2, rank=-1, exc=ValueError, word="rank"),
    C("sampler num_replicas float", ClassPairSampler, [0, 1], 2, num_replicas=2.0, rank=0, exc=ValueError,
      word="num_replicas"),
    C("sampler seed str", ClassPairSampler, [0, 1], 2, seed="x", exc=ValueError, word="seed"),
    # nn modules (arguments are checked when the module runs)
    C("PairKDLoss temperature 0", fastsd.nn.PairKDLoss(temperature=0), Z, Y, P, exc=ValueError, word="temperature"),
    C("KDLoss reduction", fastsd.nn.KDLoss(reduction="avg"), Z, Z, exc=ValueError, word="reduction"),
    C("FeatureAlignmentLoss kind", fastsd.nn.FeatureAlignmentLoss(kind="kl"), S, S, exc=ValueError, word="kind"),
    C("IntraClassPatchSwap ratio", fastsd.nn.IntraClassPatchSwap(ratio=2), X, Y, exc=ValueError, word="ratio"),
    C("IntraClassPatchSwap patch_size 0", fastsd.nn.IntraClassPatchSwap(patch_size=0), X, Y, exc=ValueError,
      word="patch_size"),
    C("IntraClassPatchSwap eval x not a tensor", fastsd.nn.IntraClassPatchSwap().eval(), X.tolist(), Y,
      exc=TypeError, word="x"),
    # backends
    C("use_backend unknown", lambda: fastsd.use_backend("gpu").__enter__(), exc=ValueError, word="backend"),
    C("forced triton on float64", _Forced("triton", fastsd.pair_kd_loss), Z.double(), Y, P,
      exc=fastsd.BackendUnavailableError, word="triton"),
    C("forced cuda on cpu tensors", _Forced("cuda", fastsd.kd_loss), Z, Z, exc=fastsd.BackendUnavailableError,
      word="cuda"),
]


def _from_lambda_table(table, module, tensors):
    """Cases of an older table, as Cases: ``(name, call, exc, word)``; ``tensors`` are the module-level
    inputs its lambdas read."""
    return [Case(f"{module}: {name}", call, (), {}, exc, word, tuple(tensors)) for name, call, exc, word in table]


CATALOGUE = (
    BAD
    + _from_lambda_table(test_losses.BAD, "test_losses", [test_losses.Z, test_losses.Y, test_losses.P, test_losses.S])
    + [Case(f"test_patch_swap: {name}", fastsd.patch_swap, args, {}, exc, word)
       for name, args, exc, word in test_patch_swap.BAD_PATCH_SWAP]
    + _from_lambda_table(test_patch_swap.BAD_HELPERS, "test_patch_swap",
                         [test_patch_swap.X, test_patch_swap.P, test_patch_swap.M])
)


def test_catalogue_size_and_names():
    names = [c.name for c in CATALOGUE]
    assert len(set(names)) == len(names), "case names must be unique"
    assert len(BAD) >= 40 and len(CATALOGUE) >= len(BAD) + 60


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif isinstance(obj, nn.Module):
        yield from obj.state_dict(keep_vars=True).values()


def _modes(obj):
    return [(m, m.training) for o in obj if isinstance(o, nn.Module) for m in o.modules()]


def _names_argument(message, word):
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?![\w\[])", message) is not None


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_bad_input(case):
    inputs = (case.args, case.kwargs, case.watch)
    watched = [t for t in _tensors(inputs) if t.device.type != "meta"]
    before = [(t.detach().clone(), t._version) for t in watched]
    modes = _modes(case.watch + case.args)
    with pytest.raises(Exception) as info:
        case.call(*case.args, **case.kwargs)
    err = info.value
    assert type(err) is case.exc, f"{case.name}: raised {type(err).__name__} ({err}), expected {case.exc.__name__}"
    assert _names_argument(str(err), case.word), f"{case.name}: the message does not name {case.word!r}: {err}"
    for t, (copy, version) in zip(watched, before):
        assert t._version == version and torch.equal(t, copy), f"{case.name}: an input was modified"
    assert all(m.training == mode for m, mode in modes), f"{case.name}: a module's mode changed"


def test_message_check_needs_the_whole_name():
    assert _names_argument("fastsd.kd_loss: teacher_logits must ...", "teacher_logits")
    assert not _names_argument("fastsd.kd_loss: teacher_logits must ...", "teacher")
    assert _names_argument("target[1] must have", "target[1]") and not _names_argument("target[1] must", "target")


# --- NaN and Inf in data propagate exactly as in the reference ------------------------------------------
#
# Every backend against the reference formula run by PyTorch on the same values: NaN exactly where the
# reference has NaN, the same infinities, and the finite values close (assert_close with equal_nan).

NAN, INF = math.nan, math.inf
UPDATE_BACKENDS = [b for b in CPU_BACKENDS if b != "torch" and not fastsd._backend.reasons(
    "icp_update", b, torch.empty(0))]  # the torch backend of icp_update is the reference itself


def _same_specials(got, ref, name):
    got, ref = got.detach(), ref.detach().to(got.dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{name}: NaN at other places than the reference"
    torch.testing.assert_close(got, ref, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _with(values, where):
    def make(x):
        x = x.clone()
        for index, v in zip(where, values):
            x[index] = v
        return x
    return make


LOGITS = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 2
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
PAIRS = torch.tensor([1, 0, 3, 2, 4, 5])  # two pairs and two singletons
PAIR_SPECIALS = {
    "nan in a paired row": _with([NAN], [(0, 3)]),
    # row 1's confidence is NaN: a tie, so row 0 (the lower index) teaches and row 1 is its student;
    # the teacher's gradient is its CE gradient only, no NaN from its student
    "nan in a pair's student": _with([NAN], [(1, 2)]),
    "nan in a singleton": _with([NAN], [(4, 1)]),
    "+inf in a paired row": _with([INF], [(2, 4)]),
    "-inf off the label (a masked class)": _with([-INF], [(3, 0)]),
    "-inf at the label": _with([-INF], [(2, 1)]),
    "-inf in both rows of a pair": _with([-INF, -INF], [(0, 4), (1, 4)]),
}


def _run(fn, x, *args, backend=None, **kw):
    x = x.detach().clone().requires_grad_()
    with fastsd.use_backend(backend):
        loss = fn(x, *args, **kw)
    (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    return loss, g


# A row with an ignored label has no term (no CE, and it is in no pair: its partner is a singleton). It is
# not read: the loss ignores its values and its gradient is exactly 0, NaN / Inf included.
LABEL_SETS = {"all valid": LABELS,
              "row 4 ignored": torch.tensor([0, 0, 1, 1, -100, 2]),  # a singleton
              "row 1 ignored": torch.tensor([0, -100, 1, 1, 2, 2]),  # in a pair: row 0 is then a singleton
              }


@pytest.mark.parametrize("teacher", ["confident", "symmetric"])
@pytest.mark.parametrize("labels", list(LABEL_SETS))
@pytest.mark.parametrize("special", list(PAIR_SPECIALS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_kd_loss_nan_inf_as_reference(backend, special, labels, teacher):
    z = PAIR_SPECIALS[special](LOGITS)
    ref = _run(R.pair_kd_loss, z, LABEL_SETS[labels], PAIRS, teacher=teacher)
    got = _run(fastsd.pair_kd_loss, z, LABEL_SETS[labels], PAIRS, teacher=teacher, backend=backend)
    _same_specials(got[0], ref[0], "loss")
    _same_specials(got[1], ref[1], "grad")
    ignored = LABEL_SETS[labels] == -100
    assert not got[1][ignored].any(), "a row with an ignored label has a nonzero gradient"


@pytest.mark.parametrize("teacher", ["confident", "symmetric"])
@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
def test_pair_kd_loss_does_not_read_what_has_no_term(backend, teacher):
    """Rows with an ignored label (a singleton, a pair's member) are not read: NaN / Inf there change
    nothing, bit for bit, and their gradient is exactly 0. A teacher's gradient has no KD part: with CE
    off it is exactly 0 even when its student's KL is infinite or NaN."""
    labels = torch.tensor([0, -100, 1, 1, -100, 2])
    fn = R.pair_kd_loss if backend is None else fastsd.pair_kd_loss
    clean = _run(fn, LOGITS, labels, PAIRS, backend=backend, teacher=teacher)
    for value in (NAN, INF, -INF):
        z = LOGITS.clone()
        z[1], z[4, 2] = value, value
        got = _run(fn, z, labels, PAIRS, backend=backend, teacher=teacher)
        assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1]), value
        assert not got[1][labels == -100].any()
    if teacher == "confident":
        # pair (2, 3): -inf at row 3's label makes it the student (KL +inf); NaN in it, a tie, too
        # (row 2, the lower index, teaches)
        for value, where in ((-INF, (3, 1)), (NAN, (3, 0))):
            z = LOGITS.clone()
            z[where] = value
            loss, g = _run(fn, z, LABELS, PAIRS, backend=backend, teacher=teacher, ce_weight=0.0)
            assert not g[2].any(), f"the teacher got a KD gradient ({value} in its student)"
            assert not torch.isfinite(loss), loss


KD_SPECIALS = {
    "nan in the student": (_with([NAN], [(1, 2)]), None),
    "nan in the teacher": (None, _with([NAN], [(3, 0)])),
    "+inf in the teacher": (None, _with([INF], [(2, 2)])),
    "-inf in the teacher (a masked class)": (None, _with([-INF], [(0, 3)])),
    "-inf in the student": (_with([-INF], [(5, 1)]), None),
}


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("special", list(KD_SPECIALS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kd_loss_nan_inf_as_reference(backend, special, reduction):
    fs, ft = KD_SPECIALS[special]
    s, t = LOGITS, LOGITS.flip(0).contiguous()
    s, t = (fs(s) if fs else s), (ft(t) if ft else t)
    ref = _run(R.kd_loss, s, t, reduction=reduction)
    got = _run(fastsd.kd_loss, s, t, reduction=reduction, backend=backend)
    _same_specials(got[0], ref[0], "loss")
    _same_specials(got[1], ref[1], "grad")


FEATURES = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)),
            torch.randn(3, 6, generator=torch.Generator().manual_seed(2))]
FEATURE_SPECIALS = {
    "nan in a student": (0, "s", NAN),
    "+inf in a student": (1, "s", INF),
    "nan in a target": (1, "t", NAN),
    "-inf in a target": (0, "t", -INF),
}


@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1", "cosine"])
@pytest.mark.parametrize("special", list(FEATURE_SPECIALS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_feature_alignment_loss_nan_inf_as_reference(backend, special, kind):
    layer, side, value = FEATURE_SPECIALS[special]
    s = [x.clone() for x in FEATURES]
    t = [x + 0.5 for x in FEATURES]
    (s if side == "s" else t)[layer].view(-1)[5] = value
    for reduction in ("mean", "none"):
        outs = []
        for fn, b in ((R.feature_alignment_loss, None), (fastsd.feature_alignment_loss, backend)):
            xs = [x.detach().clone().requires_grad_() for x in s]
            with fastsd.use_backend(b):
                loss = fn(xs, t, kind=kind, reduction=reduction)
            outs.append((loss, torch.autograd.grad(loss, xs, torch.ones_like(loss))))
        (ref, ref_g), (got, got_g) = outs
        _same_specials(got, ref, "loss")
        for l, (a, b) in enumerate(zip(got_g, ref_g)):
            _same_specials(a, b, f"grad[{l}]")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_patch_swap_nan_inf_as_reference(backend):
    x = torch.randn(4, 2, 6, 6)
    x[0, 0, 0, 0], x[1, 1, 5, 5], x[2, 0, 3, 3], x[3, 1, 0, 5] = NAN, INF, -INF, -0.0
    mask = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    partner = torch.tensor([2, 0, 3, 1])
    xr = x.clone().requires_grad_()
    with fastsd.use_backend(backend):
        out = fastsd.patch_swap(xr, partner, mask)
    g = x.flip(0).contiguous()
    (grad,) = torch.autograd.grad(out, xr, g)
    ref = R.patch_swap(x, partner, mask)
    assert torch.equal(out.detach().view(torch.int32), ref.view(torch.int32))  # bit for bit (NaN, -0.0 too)
    _same_specials(grad, R.patch_swap_backward(g, partner, mask), "grad")


@pytest.mark.parametrize("method", ["sgd", "adam", "ademamix"])
@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_icp_update_nan_inf_as_reference(backend, method):
    x = torch.randn(3, 4, 5)
    g = torch.randn(3, 4, 5)
    x[0, 0, 0], x[1, 0, 0] = NAN, INF
    g[0, 1, 1], g[1, 1, 1], g[2, 1, 1], g[2, 2, 2] = NAN, INF, -INF, 0.0
    for clamp in (None, (-1.0, 1.0)):
        a, b = x.clone(), x.clone()
        sa, sb = new_state(a, method), new_state(b, method)
        for step in (1, 2):
            with fastsd.use_backend(backend):
                icp_update_(a, g, *sa, method=method, step=step, step_size=0.1, clamp=clamp)
            R_icp.icp_update_(b, g, *sb, method, step, 0.1, 0.9, 0.999, 0.9999, 5.0, 1e-8,
                              *(clamp or (None, None)))
        _same_specials(a, b, "x")
        for u, v in zip(sa, sb):
            if u is not None:
                _same_specials(u, v, "state")


def test_icp_refiner_nan_in_one_sample_as_plain_loop():
    from test_icp import plain_refine

    model = _model()
    x, y = XR.clone(), Y
    x[1, 0, 0, 0] = NAN
    for backend in ("auto",) + tuple(UPDATE_BACKENDS):
        with fastsd.use_backend(backend):
            out = fastsd.ICPRefiner(model, steps=2, method="adam")(x, y)
        expected = plain_refine(model, x, y, 2, 2e-3, "adam")
        _same_specials(out, expected, f"refined x ({backend})")
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()
