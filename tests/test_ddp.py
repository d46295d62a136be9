"""Both recipes inside DistributedDataParallel: 2 CPU ranks, gloo, ClassPairSampler shards.

Each rank trains the same initial model on its own shard of the data (ClassPairSampler with
num_replicas=2, rank=r), so parameters stay identical across ranks only if DDP all-reduced the
gradients of every step. The ICP recipe's refinement loop differentiates the input only; run
through the DDP wrapper it would re-prepare the reducer K times per step (a grad-enabled forward
through the wrapper), so the test counts those forwards: one per step.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 3


class TinyNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def _data():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(48) % 4
    images = torch.randn(48, 3, 8, 8, generator=g) + labels.view(-1, 1, 1, 1).float() * 0.5
    return images, labels


def _worker(rank, init_file, out_dir):
    import fastsd.recipes
    from fastsd.data import ClassPairSampler
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        images, labels = _data()
        result = {}
        for name in ("patchswap", "icp", "distiller"):
            torch.manual_seed(0)  # same initial weights on every rank
            model = DDP(TinyNet())
            initial = [p.detach().clone() for p in model.module.parameters()]
            # DDP's reducer is prepared by every forward through the wrapper that runs with grad
            # enabled: there must be exactly one per step, the one whose loss is backpropagated.
            grad_forwards = []
            model.register_forward_pre_hook(lambda mod, args: grad_forwards.append(torch.is_grad_enabled()))
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            if name == "patchswap":
                recipe = fastsd.recipes.PatchSwapDistillation(model, patch_size=2)
            elif name == "distiller":  # the DDP wrapper given to ICPDistiller, with its default refiner
                recipe = fastsd.ICPDistiller(model, ["module.stem", "module.block"], warmup=0.25)
                assert recipe.refiner.model is model.module
            else:
                recipe = fastsd.recipes.ICPDistillation(model, ["stem", "block"], steps=2, step_size=1e-2,
                                                        warmup=0.25)
                assert recipe.refiner.model is model.module
            sampler = ClassPairSampler(labels, batch_size=8, seed=0, num_replicas=WORLD, rank=rank)
            losses, batches = [], []
            for step, batch in zip(range(STEPS), sampler):
                x, y = images[batch], labels[batch]
                if name == "patchswap":
                    out = recipe(x, y, partner=ClassPairSampler.partner(len(batch)))
                elif name == "distiller":
                    out = recipe(x, y, step / STEPS)
                else:
                    out = recipe(x, y, progress=step / STEPS)  # step 0 in warm-up, then refining
                opt.zero_grad()
                out["loss"].backward()
                opt.step()
                losses.append(out["loss"].detach())
                batches.append(batch)
            result[name] = {
                "losses": torch.stack(losses),
                "batches": batches,
                "params": [p.detach().clone() for p in model.module.parameters()],
                "initial": initial,
                "grad_forwards": sum(grad_forwards),
            }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("recipe", ["patchswap", "icp", "distiller"])
def test_recipe_under_ddp(ranks, recipe):
    r0, r1 = ranks[0][recipe], ranks[1][recipe]
    # the ranks saw different data (ClassPairSampler shards) ...
    anchors = [[set(b[: len(b) // 2]) for b in r["batches"]] for r in (r0, r1)]
    assert all(a0.isdisjoint(a1) for a0, a1 in zip(*anchors))
    for r in (r0, r1):
        assert len(r["losses"]) == STEPS and torch.isfinite(r["losses"]).all()
        assert r["grad_forwards"] == STEPS  # no forward of the refinement loop went through DDP
    assert not torch.equal(r0["losses"], r1["losses"])
    # ... yet every parameter is the same on both ranks after the steps, and training moved them
    for p0, p1 in zip(r0["params"], r1["params"]):
        assert torch.equal(p0, p1)
    assert any(not torch.equal(p, q) for p, q in zip(r0["params"], r0["initial"]))
