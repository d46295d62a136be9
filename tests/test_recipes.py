"""fastsd.recipes: each recipe is the composition of the fastsd ops it names, trains a tiny model
with any optimiser, and a whole training step of it compiles with torch.compile(fullgraph=True)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastsd
import fastsd.recipes as recipes
from fastsd.data import ClassPairSampler


class TinyNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def batch(n=12, size=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, size, size, generator=g) + 2 * y.view(-1, 1, 1, 1).float()
    return x, y


# --- patch swap -----------------------------------------------------------------------------------


def test_patch_swap_recipe_is_swap_then_pair_kd_loss():
    model = TinyNet()
    x, y = batch()
    recipe = recipes.PatchSwapDistillation(model, temperature=3.0, kd_weight=0.7, patch_size=2, ratio=0.25,
                                           generator=torch.Generator().manual_seed(4))
    out = recipe(x, y)
    swapped, partner, mask = fastsd.intra_class_patch_swap(x, y, patch_size=2, ratio=0.25,
                                                           generator=torch.Generator().manual_seed(4))
    assert torch.equal(out["partner"], partner) and torch.equal(out["mask"], mask)
    assert mask.shape == (12, 4, 4) and mask.sum() == 12 * 4  # every row of a full batch is paired
    logits = model(swapped)
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["loss"], fastsd.pair_kd_loss(logits, y, partner, temperature=3.0, kd_weight=0.7))
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_patch_swap_recipe_takes_the_sampler_pairing():
    model = TinyNet()
    x, y = batch(8)
    idx = torch.tensor([0, 1, 2, 4, 3, 7, 5, 6])  # anchors 0, 1, 2, 4; partners of the same class
    x, y = x[idx], torch.tensor([0, 1, 2, 1, 0, 1, 2, 1])
    partner = ClassPairSampler.partner(8)
    out = recipes.PatchSwapDistillation(model, patch_size=4)(x, y, progress=0.3, partner=partner)
    assert torch.equal(out["partner"], partner)
    assert torch.equal(out["mask"], out["mask"][partner])  # both members share a mask
    torch.testing.assert_close(out["loss"], fastsd.pair_kd_loss(out["logits"], y, partner))


def test_patch_swap_recipe_bad_arguments():
    model = TinyNet()
    with pytest.raises(TypeError, match="model"):
        recipes.PatchSwapDistillation(lambda x: x)
    with pytest.raises(ValueError, match="teacher"):
        recipes.PatchSwapDistillation(model, teacher="loudest")
    with pytest.raises(ValueError, match="ratio"):
        recipes.PatchSwapDistillation(model, ratio=1.5)
    x, y = batch()
    with pytest.raises(ValueError, match="patch_size"):
        recipes.PatchSwapDistillation(model, patch_size=9)(x, y)
    with pytest.raises(ValueError, match="length"):
        recipes.PatchSwapDistillation(model)(x, y[:5])
    with pytest.raises(ValueError, match="progress"):
        recipes.PatchSwapDistillation(model)(x, y, progress=2.0)


# --- ICP ------------------------------------------------------------------------------------------


def test_icp_recipe_schedule_and_components():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = batch()
    recipe = recipes.ICPDistillation(model, ["stem", "block"], steps=2, step_size=1e-2, warmup=0.5)
    assert recipe.refiner.model is model and recipe.refiner.steps == 2 and recipe.refiner.method == "adam"

    warm = recipe(x, y, progress=0.5)  # still warming up: task loss only
    assert warm["alpha"] == 1.0 and float(warm["feature"]) == 0.0
    torch.testing.assert_close(warm["loss"], F.cross_entropy(model(x), y))

    late = recipe(x, y, progress=0.75)
    assert late["alpha"] == pytest.approx(math.cos(math.pi / 4))
    assert float(late["feature"].detach()) > 0
    torch.testing.assert_close(late["loss"], late["alpha"] * late["task"] + (1 - late["alpha"]) * late["feature"])
    late["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_icp_recipe_progress_from_total_steps():
    model = TinyNet()
    x, y = batch()
    recipe = recipes.ICPDistillation(model, ["block"], steps=1, warmup=0.0, total_steps=4, schedule="step")
    alphas = [recipe(x, y)["alpha"] for _ in range(5)]
    assert alphas == pytest.approx([1.0] + [math.cos(math.pi / 2 * k / 4) for k in (1, 2, 3, 4)])
    # the default (per-epoch) schedule: 4 steps in 2 epochs, each call read at its epoch's start
    recipe = recipes.ICPDistillation(model, ["block"], steps=1, warmup=0.0, total_steps=4, epochs=2)
    alphas = [recipe(x, y)["alpha"] for _ in range(5)]
    assert alphas == pytest.approx([1.0, 1.0, math.cos(math.pi / 4), math.cos(math.pi / 4), 0.0])
    with pytest.raises(ValueError, match="total_steps= with schedule='epoch' needs epochs="):
        recipes.ICPDistillation(model, ["block"], total_steps=4)
    with pytest.raises(ValueError, match="progress"):
        recipes.ICPDistillation(model, ["block"])(x, y)
    with pytest.raises(ValueError, match="unknown layers"):
        recipes.ICPDistillation(model, ["layer9"])


def test_icp_recipe_refines_the_wrapped_module():
    model = TinyNet()
    wrapped = nn.DataParallel(model)  # on CPU it just calls the module; the names get "module."
    recipe = recipes.ICPDistillation(wrapped, ["stem", "module.block"], steps=1)
    assert recipe.refiner.model is model
    assert recipe.distiller.layers == ("module.stem", "module.block")
    x, y = batch()
    out = recipe(x, y, progress=0.9)
    assert torch.isfinite(out["loss"]) and float(out["feature"].detach()) > 0


# --- any model, any optimiser: a few steps reduce the loss ----------------------------------------


@pytest.mark.parametrize("name", ["patchswap", "icp"])
@pytest.mark.parametrize("optimizer,kwargs", [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.AdamW, {})],
                         ids=["SGD", "AdamW"])
def test_recipes_train_a_tiny_model(name, optimizer, kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    x, y = batch(24)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = F.cross_entropy(model(x), y)
        model.train()
        return loss

    before = eval_loss()
    opt = optimizer(model.parameters(), lr=0.05, **kwargs)
    recipe = (recipes.PatchSwapDistillation(model, patch_size=2) if name == "patchswap"
              else recipes.ICPDistillation(model, ["stem", "block"], steps=2, warmup=0.3, total_steps=30,
                                               schedule="step"))
    for _ in range(30):
        loss = recipe(x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before


# --- torch.compile of a whole training step -------------------------------------------------------


def _train_step(recipe, params, lr):
    def step(x, y, progress):
        out = recipe(x, y, progress)
        out["loss"].backward()
        with torch.no_grad():  # plain SGD: torch.optim's step() graph-breaks on purpose
            for p in params:
                p.sub_(lr * p.grad)
                p.grad = None
        return out["loss"].detach()

    return step


def _compiled_vs_eager(make_recipe, steps=2, backend="inductor"):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    results = []
    for compiled in (True, False):
        torch.manual_seed(0)
        model = TinyNet()
        recipe = make_recipe(model)
        params = list(model.parameters())
        step = _train_step(recipe, params, lr=0.1)
        x, y = batch(12)
        torch._dynamo.reset()
        # fallback_random: compiled RNG == eager RNG; trace_autograd_ops: backward() in the graph;
        # error_on_recompile: the steps after the first run the first one's graph
        with inductor_config.patch(fallback_random=True), \
                torch._dynamo.config.patch(trace_autograd_ops=True, error_on_recompile=True):
            if compiled:
                step = torch.compile(step, fullgraph=True, backend=backend)
            torch.manual_seed(1)
            losses = [step(x, y, 0.8) for _ in range(steps)]
        results.append((torch.stack(losses), [p.detach().clone() for p in params],
                        [b.clone() for b in model.buffers()]))
    (lc, pc, bc), (le, pe, be) = results
    torch.testing.assert_close(lc, le)
    for a, b in zip(pc + bc, pe + be):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_patch_swap_step_matches_eager():
    # Dynamo and AOTAutograd: the whole step in one graph (fullgraph), the ops' fake kernels and
    # autograd, in the eager kernels' arithmetic. Inductor's code for this step's ops and the glue
    # around them is checked op by op (test_patch_swap, test_launches): here it added the C++ kernels
    # of TinyNet's layers, about 40 s of compile time (torch's code, not fastsd's). The ICP step
    # below, whose refinement loop and feature loss are checked nowhere else under Inductor, keeps it.
    _compiled_vs_eager(lambda model: recipes.PatchSwapDistillation(model, patch_size=2), backend="aot_eager")


def test_compile_fullgraph_icp_step_matches_eager():
    _compiled_vs_eager(lambda model: recipes.ICPDistillation(model, ["stem", "block"], steps=2, warmup=0.25))


# --- the ICP paper's trainer ----------------------------------------------------------------------


def _papers_step(model, layers, x, y, optimizer, *, epoch, epochs, warmup_epochs, iters, lr, leak):
    """One step of the ICP paper's trainer loop body (adam refinement, cosine layer weights, MSE),
    written out here from its description; ``leak``: keep its backward of the refinement's first loss."""
    feats = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o)) for n, m in layers.items()]
    alpha = 1.0 if epoch <= warmup_epochs else math.cos(math.pi * (epoch - warmup_epochs) / (2 * (epochs - warmup_epochs)))
    weights = [math.cos(l / (len(layers) - 1) * math.pi / 4) for l in range(len(layers))]
    model.train()
    out = model(x)
    student = dict(feats)
    task = F.cross_entropy(out, y)
    model.eval()
    xr = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xr), y)
    if leak:
        loss.backward(retain_graph=True)
    m = v = 0
    for t in range(iters):
        (g,) = torch.autograd.grad(loss, xr)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        xr = xr - lr * (m / (1 - 0.9 ** (t + 1))) / ((v / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
        loss = F.cross_entropy(model(xr), y)
    model.train()
    model(xr)
    feature = sum(w * F.mse_loss(feats[n].detach(), student[n]) for w, n in zip(weights, layers))
    total = alpha * task + (1 - alpha) * feature
    total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    return total.detach()


def test_icp_recipe_is_the_papers_step_without_its_gradient_leak():
    x, y = batch(8)
    epochs, warmup_epochs, iters, lr = 4, 1, 3, 3e-4
    runs = {}
    for name in ("paper", "paper_leak", "fastsd"):
        torch.manual_seed(0)
        model = TinyNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # (AdamW's first step would see gradient signs only)
        layers = {"stem": model.stem, "block": model.block}
        if name == "fastsd":
            sd = recipes.ICPDistillation(model, list(layers.values()), steps=iters, step_size=lr, method="adam",
                                         warmup=warmup_epochs / epochs, epochs=epochs)
            out = sd(x, y, progress=(3 + 0.5) / epochs)  # mid-epoch 3: the weight of epoch 3
            out["loss"].backward()
            optimizer.step()
            loss = out["loss"].detach()
        else:
            loss = _papers_step(model, layers, x, y, optimizer, epoch=3, epochs=epochs, warmup_epochs=warmup_epochs,
                                iters=iters, lr=lr, leak=name == "paper_leak")
        runs[name] = (loss, [p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()])
    (lp, pp, bp), (_, pl, _), (lf, pf, bf) = runs["paper"], runs["paper_leak"], runs["fastsd"]
    torch.testing.assert_close(lf, lp)
    for a, b in zip(pf, pp):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(pl, pp))  # the leak changes the step
    # BatchNorm: the trainer's target pass updates the running statistics a second time
    assert not torch.allclose(bf[0], bp[0])
