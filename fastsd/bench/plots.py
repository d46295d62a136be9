"""PNG plots of a benchmark run (matplotlib, imported only when plots are asked for)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

from .core import Row, measure, timed_backends


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speedup_plot(rows: List[Row], path: str, title: str) -> str:
    """One panel per op: each backend's speedup against each baseline, per case (log scale)."""
    plt = _plt()
    ops = list(dict.fromkeys(r.op for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r.op == op and r.kind == "backend"]
        cases = list(dict.fromkeys(r.case for r in op_rows))
        labels = [f"{r.impl} vs {b}" for r in op_rows for b in r.speedup]
        series: Dict[str, List[float]] = {lab: [float("nan")] * len(cases) for lab in dict.fromkeys(labels)}
        for r in op_rows:
            for b, v in r.speedup.items():
                series[f"{r.impl} vs {b}"][cases.index(r.case)] = v
        width = 0.8 / max(1, len(series))
        for k, (lab, vals) in enumerate(series.items()):
            ax.bar([i + k * width for i in range(len(cases))], vals, width, label=lab)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=8)
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"{op}: speedup of each fastsd backend (higher is better)")
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def patch_swap_size_plot(device, dtype, path: str, title: str, batches: Sequence[int] = (16, 32, 64, 128, 256),
                         min_time: float = 0.1) -> str:
    """Median time against batch size for 3 x 32 x 32 images, 8 x 8 grid: each backend and x.clone()."""
    from .. import _backend
    from ..patch_swap import patch_swap
    from .cases import PatchSwapCase

    plt = _plt()
    backends = timed_backends("patch_swap", device)
    curves: Dict[str, List[float]] = {b: [] for b in backends + ["clone"]}
    for B in batches:
        x, partner, mask = PatchSwapCase(f"b{B}", (B, 3, 32, 32), (8, 8), classes=10).make(dtype, device)
        for b in backends:
            def run(b=b):
                with _backend.use_backend(b):
                    patch_swap(x, partner, mask)
            ts = measure(run, torch.device(device), min_time=min_time)
            curves[b].append(sorted(ts)[len(ts) // 2] * 1e3)
        ts = measure(lambda: x.clone(), torch.device(device), min_time=min_time)
        curves["clone"].append(sorted(ts)[len(ts) // 2] * 1e3)
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


def write_plots(rows: List[Row], out_dir: str, env: dict, device, dtype) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    title = f"{env['device']} ({env['cpu']}, {env['cores']} cores), torch {env['torch']}, commit {env['commit']}"
    paths = [speedup_plot(rows, os.path.join(out_dir, "speedup.png"), title)]
    if any(r.op == "patch_swap" for r in rows):
        paths.append(patch_swap_size_plot(device, dtype, os.path.join(out_dir, "patch_swap_size.png"), title))
    return paths
