"""PNG plots of a benchmark run (matplotlib, imported only when plots are asked for)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np
import torch

from .core import COPY, interleave, timed_backends
from .report import SHORT


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speedup_plot(rows: List[dict], path: str, title: str) -> str:
    """One panel per op: each backend's speedup against each baseline, per case (log scale), with
    the bootstrap 95 % interval of each as an error bar."""
    plt = _plt()
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r["op"] == op and r["kind"] == "backend"]
        cases = list(dict.fromkeys(r["case"] for r in op_rows))
        labels = [f"{r['impl']} vs {SHORT.get(b, b)}" for r in op_rows for b in r["speedup"] if b != COPY]
        series: Dict[str, np.ndarray] = {lab: np.full((3, len(cases)), np.nan) for lab in dict.fromkeys(labels)}
        for r in op_rows:
            for b, v in r["speedup"].items():
                if b != COPY:
                    lo, hi = r.get("speedup_ci", {}).get(b, (v, v))
                    series[f"{r['impl']} vs {SHORT.get(b, b)}"][:, cases.index(r["case"])] = (v, lo, hi)
        width = 0.8 / max(1, len(series))
        for k, (lab, (v, lo, hi)) in enumerate(series.items()):
            ax.bar([i + k * width for i in range(len(cases))], v, width, label=lab,
                   yerr=np.stack([v - lo, hi - v]), capsize=2, error_kw=dict(lw=0.7))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=8)
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"{op}: speedup of each fastsd backend, 95 % interval (higher is better)")
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def patch_swap_size_plot(device, dtype, path: str, title: str, batches: Sequence[int] = (16, 32, 64, 128, 256),
                         min_time: float = 0.1, clock: str = "wall") -> str:
    """Median time against batch size for 3 x 32 x 32 images, 8 x 8 grid: each backend and x.clone()."""
    from .. import _backend
    from ..patch_swap import patch_swap
    from .cases import PatchSwapCase

    plt = _plt()
    backends = timed_backends("patch_swap", device)
    curves: Dict[str, List[float]] = {b: [] for b in backends + ["clone"]}
    for B in batches:
        x, partner, mask = PatchSwapCase(f"b{B}", (B, 3, 32, 32), (8, 8), classes=10).make(dtype, device)

        def run(b):
            def call():
                with _backend.use_backend(b):
                    patch_swap(x, partner, mask)
            return call

        fns = {b: run(b) for b in backends}
        fns["clone"] = lambda: x.clone()
        times = interleave(fns, torch.device(device), min_time=min_time, min_rounds=5, clock=clock)
        for name, ts in times.items():
            curves[name].append(float(np.median(ts)) * 1e3)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(batches, ys, marker="o", label=name, ls="--" if name == "clone" else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (3 x 32 x 32, grid 8 x 8)")
    ax.set_ylabel("median time (ms)")
    ax.set_title("patch_swap: time vs size", fontsize=10)
    ax.legend()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict, out_dir: str, env: dict, device, dtype) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    title = f"{env['device']} ({env['cpu']}, {env['cores']} cores), torch {env['torch']}, commit {env['commit']}"
    rows = report["rows"]
    paths = [speedup_plot(rows, os.path.join(out_dir, "speedup.png"), title)]
    if any(r["op"] == "patch_swap" for r in rows):
        paths.append(patch_swap_size_plot(device, dtype, os.path.join(out_dir, "patch_swap_size.png"), title,
                                          clock=env.get("clock", "wall")))
    return paths
