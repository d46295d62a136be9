"""examples/sweep.py's machinery on one tiny setting for 1 epoch: the JSON cache (a rerun trains
nothing, a changed fingerprint retrains), the tables, the plot and the README section. Not the
accuracies: those are the sweep's output, measured by `make readme-accuracy`."""
import json
import os
import re
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import sweep  # noqa: E402
import train  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(sweep, "SETTINGS", {"tiny": dict(epochs=1, train_fraction=0.1)})
    monkeypatch.setattr(sweep, "AXES", dict(sweep.AXES, ratio=[0.2, 0.5]))
    calls = []
    real = train.train

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep.T, "train", counting)
    return calls


def test_sweep_cache_tables_and_readme(tiny, tmp_path):
    calls = tiny
    pts = sweep.points(["tiny"], axes={"ratio": [0.2, 0.5]}, icp=False)
    # cross-entropy, the recipe defaults (ratio 0.5) and ratio 0.2: the default is not run twice
    assert [p["method"] for p in pts] == ["ce", "patchswap", "patchswap"]
    assert [p.get("ratio") for p in pts] == [None, 0.5, 0.2]
    cache_path = str(tmp_path / "sweep.json")
    seeds = [0, 1]
    cache = sweep.run_sweep(pts, seeds, cache_path, log=None)
    assert len(calls) == 6
    # each run went through train() with one thread, its setting and its seed
    assert all(kw["threads"] == 1 and kw["epochs"] == 1 and kw["train_fraction"] == 0.1 for _, kw in calls)
    assert sorted(kw["seed"] for _, kw in calls) == [0, 0, 0, 1, 1, 1]
    assert calls[2][1]["recipe_args"]["ratio"] == 0.5 and calls[4][1]["recipe_args"]["ratio"] == 0.2
    with open(cache_path) as f:
        stored = json.load(f)
    assert len(stored["runs"]) == 6
    assert all(r["fingerprint"] == sweep.fingerprint(json.loads(k)["method"]) and 0 <= r["test_acc"] <= 1
               for k, r in stored["runs"].items())

    # a rerun finds every run cached and trains nothing
    sweep.run_sweep(pts, seeds, cache_path, log=None)
    assert len(calls) == 6
    # a run cached under other code is run again, the others are kept
    k = sweep.key(pts[2], 1)
    stored["runs"][k]["fingerprint"] = "other code"
    with open(cache_path, "w") as f:
        json.dump(stored, f)
    cache = sweep.run_sweep(pts, seeds, cache_path, log=None)
    assert len(calls) == 7 and calls[-1][1]["seed"] == 1 and calls[-1][1]["recipe_args"]["ratio"] == 0.2
    assert cache["runs"][k]["fingerprint"] == sweep.fingerprint("patchswap")

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- accuracy:start -->\nold\n<!-- accuracy:end -->\nafter\n")
    out = tmp_path / "docs"
    rows = sweep.reports(cache, pts, seeds, out_dir=str(out), readme=str(readme))
    assert len(rows) == 3
    by_ratio = {r["point"].get("ratio"): r for r in rows}
    for r in rows:  # the table's numbers are the cached accuracies' mean and sample std
        accs = [100 * cache["runs"][sweep.key(r["point"], s)]["test_acc"] for s in seeds]
        mean = sum(accs) / 2
        assert r["mean"] == pytest.approx(mean)
        assert r["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
        assert r["diff"] == pytest.approx(mean - by_ratio[None]["mean"])
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n\nbefore\n<!-- accuracy:start -->\n")
    assert text.endswith("<!-- accuracy:end -->\nafter\n")
    assert "| tiny | cross-entropy |" in text and "| tiny | patch swap, recipe defaults |" in text
    assert "- `tiny`: " in text and " of 2 patch-swap points above cross-entropy " in " ".join(text.split())
    assert "(patch_swap_sweep.png)" not in text and "docs/patch_swap_sweep.png" in text
    assert (out / "patch_swap_sweep.png").stat().st_size > 1000
    full = (out / "sweep.md").read_text()
    assert f"| tiny | {sweep.describe(by_ratio[0.2]['point'])} |" in full
    assert f"{by_ratio[0.2]['mean']:.2f} ± {by_ratio[0.2]['std']:.2f}" in full


def test_summarise_leaves_out_incomplete_points(tiny, tmp_path):
    pts = sweep.points(["tiny"], axes={}, icp=False)
    cache = sweep.run_sweep(pts[:1], [0], str(tmp_path / "c.json"), log=None)
    rows = sweep.summarise(cache, pts, [0])
    assert [r["point"]["method"] for r in rows] == ["ce"]  # patch swap has no run yet
    assert sweep.summarise(cache, pts, [0, 1]) == []  # seed 1 missing


def test_train_is_reproducible_and_checks_its_arguments():
    kw = dict(epochs=1, train_fraction=0.1, seed=3, device="cpu", log=None)
    a = train.train("patchswap", pairing="sampler", **kw)
    b = train.train("patchswap", pairing="sampler", **kw)
    assert a["history"] == b["history"]
    # scoring the held-out set between epochs changes nothing in the training
    two = dict(kw, epochs=2)
    every, last = train.train("patchswap", eval_every=1, **two), train.train("patchswap", eval_every=0, **two)
    assert every["history"][0]["test_acc"] is not None and last["history"][0]["test_acc"] is None
    assert [h["loss"] for h in every["history"]] == [h["loss"] for h in last["history"]]
    assert every["test_acc"] == last["test_acc"]
    with pytest.raises(ValueError, match="pairing"):
        train.train("ce", pairing="sampler", **kw)
    with pytest.raises(ValueError, match="patchswap only"):
        train.train("ce", recipe_args={"ratio": 0.2}, **kw)
    with pytest.raises(ValueError, match="label_noise"):
        train.digits(label_noise=1.0)


def test_label_noise_and_small_split():
    x, y, xt, yt = train.digits()
    xs, ys, _, yt2 = train.digits(train_fraction=0.15)
    assert len(ys) == round(0.15 * len(y)) or abs(len(ys) - 0.15 * len(y)) < 1
    assert (yt2 == yt).all()  # the test split does not move
    _, yn, _, _ = train.digits(label_noise=0.2)
    flipped = (yn != y).float().mean().item()
    assert flipped == pytest.approx(0.2, abs=1 / len(y))  # every chosen label moves to another class


def test_fingerprint_follows_the_code_not_its_text(tmp_path, monkeypatch):
    # cross-entropy runs no fastsd code; patch swap and ICP have their own fingerprints
    assert len({sweep.fingerprint(m) for m in ("ce", "patchswap", "icp")}) == 3
    src = 'def f(x):\n    """Doc."""\n    return x + 1  # why\n'
    a, b, c = (tmp_path / n for n in ("a.py", "b.py", "c.py"))
    a.write_text(src)
    b.write_text(src.replace("Doc.", "Other doc.").replace("# why", "# because"))
    c.write_text(src.replace("x + 1", "x + 2"))
    assert sweep._code(str(a)) == sweep._code(str(b)) != sweep._code(str(c))

    # the recipe's defaults for the arguments the sweep always passes do not reach a sweep run;
    # its code does
    import fastsd.recipes

    text = open(fastsd.recipes.__file__).read()
    before = sweep._recipe_code()
    default = re.search(r" ratio: float = [0-9.]+,", text).group(0)
    for change, same in (((default, " ratio: float = 0.35,"), True),
                         (("self.ratio = V.unit_interval", "self.ratio = 0.5 * V.unit_interval"), False)):
        assert change[0] in text
        edited = tmp_path / "recipes.py"
        edited.write_text(text.replace(change[0], change[1]))
        monkeypatch.setattr(fastsd.recipes, "__file__", str(edited))
        assert (sweep._recipe_code() == before) == same
    # ICP runs do not execute PatchSwapDistillation: its edits leave their fingerprint alone
    monkeypatch.setattr(fastsd.recipes, "__file__", str(tmp_path / "none.py"))
    (tmp_path / "none.py").write_text(text)
    icp = sweep._recipes_without_patch_swap()
    for change, same in ((("self.ratio = V.unit_interval", "self.ratio = 0.5 * V.unit_interval"), True),
                         (("warmup: float = 0.25", "warmup: float = 0.3"), False)):
        assert change[0] in text
        (tmp_path / "none.py").write_text(text.replace(change[0], change[1]))
        assert (sweep._recipes_without_patch_swap() == icp) == same


def _fake_cache(pts, seeds, acc):
    """Cached runs with the current fingerprints and accuracies acc(point, seed): no training."""
    return {"runs": {sweep.key(p, s): {"test_acc": acc(p, s), "seconds": 1.0,
                                       "fingerprint": sweep.fingerprint(p["method"])} for p in pts for s in seeds}}


def test_moved_defaults_verdict_and_headline(tiny, monkeypatch):
    # the recipe's defaults moved to ratio 0.2: the sweep keeps its centre (ratio 0.5), adds no point
    # for the new defaults (ratio 0.2 is on the axis), and the headline shows both
    monkeypatch.setattr(sweep, "recipe_defaults", lambda size=16: dict(sweep.CENTER, ratio=0.2))
    pts = sweep.points(["tiny"], axes={"ratio": [0.2, 0.5], "kd_weight": [0.0, 1.0]}, icp=False)
    assert [(p["method"], p.get("ratio"), p.get("kd_weight")) for p in pts] == [
        ("ce", None, None), ("patchswap", 0.5, 1.0), ("patchswap", 0.2, 1.0), ("patchswap", 0.5, 0.0)]
    seeds = [0, 1, 2]
    # ce 0.90 +- 0.01; ratio 0.5 below it, ratio 0.2 above it outside noise, kd 0 level with it
    means = {(None, None): 0.90, (0.5, 1.0): 0.85, (0.2, 1.0): 0.95, (0.5, 0.0): 0.905}
    cache = _fake_cache(pts, seeds, lambda p, s: means[p.get("ratio"), p.get("kd_weight")] + 0.01 * (s - 1))
    rows = sweep.summarise(cache, pts, seeds)
    by = {(r["point"].get("ratio"), r["point"].get("kd_weight")): r for r in rows}
    assert by[0.2, 1.0]["diff"] == pytest.approx(5.0) and by[0.2, 1.0]["outside_noise"]
    assert by[0.5, 1.0]["diff"] == pytest.approx(-5.0) and by[0.5, 1.0]["outside_noise"]
    assert by[0.5, 0.0]["se"] == pytest.approx((2 / 3) ** 0.5) and not by[0.5, 0.0]["outside_noise"]
    names = [sweep.describe(r["point"]) + (" centre" if r.get("centre") else "") for r in sweep.headline(rows)]
    # the defaults are also the best point: listed once
    assert names == ["cross-entropy", "patch swap, recipe defaults", "patch swap, ratio=0.5 centre"]
    text = " ".join(sweep.verdict(rows).split())  # unwrapped
    assert text.startswith("**Patch swap beats cross-entropy outside noise only in the tiny setting")
    assert "1 of 3 patch-swap points above cross-entropy (90.00 %) outside noise, 1 below it" in text
    assert "recipe defaults +5.00 ± 0.82" in text

    # nothing above cross-entropy: said first
    cache = _fake_cache(pts, seeds, lambda p, s: 0.90 + 0.01 * (s - 1) - 0.05 * (p["method"] != "ce"))
    assert " ".join(sweep.verdict(sweep.summarise(cache, pts, seeds)).split()).startswith(
        "**No patch-swap setting beats cross-entropy outside noise on digits**")
