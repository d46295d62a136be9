"""The benchmark report: one narrow table per op, a summary line per op, the verdicts on targets and
lower bounds, the README section, and the comparison of two reports.

Everything here reads the JSON report's plain data (``rows``, ``cases``, ``checks``: lists of
dicts), so a table printed from a saved report reads the same as the one printed by the run.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .core import COPY

WIDTH = 110  # every terminal table stays narrower than this
# Column headers name the baselines by these short names (the impl column keeps the full ones).
SHORT = {"eager_where": "where", "compiled_ref": "compiled", "bare_fwd_grad": "floor", "optim_adam": "adam"}


@dataclass
class Col:
    group: str  # printed above the column (left-aligned over the columns that share it)
    label: str
    align: str = ">"
    md: str = ""  # the markdown header (default: group and label)


def render(cols: Sequence[Col], sections: Sequence[Tuple[Optional[str], List[List[str]]]], gap: int = 2) -> str:
    """A plain-text table with a two-line header; each section starts with its title line."""
    widths = [len(c.label) for c in cols]
    for _, rows in sections:
        for row in rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    i = 0
    while i < len(cols):  # widen a group's last column until the group's title fits over it
        j = i
        while j + 1 < len(cols) and cols[j + 1].group == "" and cols[i].group:
            j += 1
        span = sum(widths[i:j + 1]) + gap * (j - i)
        if len(cols[i].group) > span:
            widths[j] += len(cols[i].group) - span
        i = j + 1
    sep = " " * gap

    def line(cells, aligns):
        return sep.join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths)).rstrip()

    groups, pos = [], 0
    for c, w in zip(cols, widths):
        if c.group:
            groups.append((pos, c.group))
        pos += w + gap
    top = ""
    for p, g in groups:
        top = top.ljust(p) + g
    out = [top.rstrip(), line([c.label for c in cols], [c.align for c in cols]),
           line(["-" * w for w in widths], ["<"] * len(cols))]
    for title, rows in sections:
        if title:
            out.append(title)
        out += [line(r, [c.align for c in cols]) for r in rows]
    return "\n".join(out)


def render_md(cols: Sequence[Col], rows: List[List[str]], bold: Sequence[bool] = ()) -> str:
    """A markdown table; rows flagged in ``bold`` are set in bold."""
    head = [c.md or " ".join(x for x in (c.group, c.label) if x) for c in cols]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" if c.align == "<" else "---:" for c in cols) + " |"]
    for k, r in enumerate(rows):
        cells = [f"**{c}**" if k < len(bold) and bold[k] and c not in ("", "-") else c for c in r]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# --- numbers -----------------------------------------------------------------------------------


def fmt_ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def fmt_x(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_mb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def half_width(m: float, lo: float, hi: float) -> str:
    """The interval as the larger of its two distances from the median, in % of it."""
    return f"±{100 * max(hi - m, m - lo) / m:.0f}%" if m > 0 else "-"


def fmt_pct(v: float) -> str:
    return "<1%" if v < 1 else f"{v:.0f}%"


def fmt_err(v: Optional[float]) -> str:
    return "-" if v is None else "0" if v == 0 else f"{v:.0e}"


def fmt_interval(m: float, lo: float, hi: float) -> str:
    return f"{fmt_x(m)} ({fmt_x(lo)}-{fmt_x(hi)})"


# --- one op ------------------------------------------------------------------------------------


def _baselines(rows: List[dict], cases: Sequence[dict] = ()) -> List[str]:
    """The speedup columns of these rows: the cases' ``speedup_vs`` in order, then any other
    baseline a row has a ratio against (the copy is a column of its own)."""
    out: List[str] = []
    names = {r["case"] for r in rows}
    for c in cases:
        if c["case"] in names and c["op"] == rows[0]["op"]:
            out += [b for b in c.get("speedup_vs", ()) if b not in out]
    for r in rows:
        out += [b for b in r["speedup"] if b != COPY and b not in out]
    return out


def _marks(checks: List[dict]) -> Dict[Tuple[str, str, str], str]:
    """(case, impl, vs) -> "!" (target missed, or faster than the lower bound) or "?" (unsure)."""
    out = {}
    for c in checks:
        if c["status"] in ("missed", "faster"):
            out[c["case"], c["impl"], c["vs"]] = "!"
        elif c["status"] == "unsure":
            out.setdefault((c["case"], c["impl"], c["vs"]), "?")
    return out


def _columns(rows: List[dict], peak_gbps: Optional[float], cases: Sequence[dict] = (),
             markdown: bool = False) -> List[Tuple[Col, object]]:
    """(column, cell function) for the columns these rows have."""
    cols: List[Tuple[Col, object]] = []
    if markdown:
        cols.append((Col("", "case", "<"), lambda r: r["case"]))
    cols.append((Col("", "impl", "<"), lambda r: r["impl"] + ("*" if r["kind"] == "baseline" else "")))
    cols.append((Col("time", "ms", md="ms"), lambda r: fmt_ms(r["median_ms"])))
    cols.append((Col("", "±", md="±"), lambda r: half_width(r["median_ms"], *r["ci_ms"])))
    if any(r["gbps"] for r in rows):
        cols.append((Col("bandwidth", "GB/s", md="GB/s"), lambda r: f"{r['gbps']:.1f}" if r["gbps"] else "-"))
        cols.append((Col("", "% copy", md="% copy"),
                     lambda r: fmt_pct(100 * r["speedup"][COPY]) if COPY in r["speedup"] else "-"))
        if peak_gbps:
            cols.append((Col("", "% peak", md="% peak"),
                         lambda r: f"{100 * r['gbps'] / peak_gbps:.0f}%" if r["gbps"] else "-"))
    for k, b in enumerate(_baselines(rows, cases)):
        def cell(r, b=b):
            if b not in r["speedup"]:
                return ""
            m, (lo, hi) = r["speedup"][b], r["speedup_ci"][b]
            return f"{fmt_x(m)}{half_width(m, lo, hi)}{r['_marks'].get(b, '')}"
        cols.append((Col("speedup x" if k == 0 else "", SHORT.get(b, b), md=f"x {SHORT.get(b, b)}"), cell))
    if any(r["max_err"] is not None for r in rows):
        cols.append((Col("max", "err", md="max err"), lambda r: fmt_err(r["max_err"])))
    cols.append((Col("peak", "MB", md="peak MB"), lambda r: fmt_mb(r["peak_mb"])))
    cols.append((Col("per call", "launches", md="launches"),
                 lambda r: "-" if r["kernels"] is None else str(r["kernels"])))
    cols.append((Col("", "MB", md="MB moved"), lambda r: fmt_mb(r["moved_mb"])))
    return cols


def _with_marks(rows: List[dict], checks: List[dict]) -> List[dict]:
    marks = _marks(checks)
    return [dict(r, _marks={vs: m for (case, impl, vs), m in marks.items() if case == r["case"] and impl == r["impl"]})
            for r in rows]


def best_rows(rows: List[dict], cases: Dict[Tuple[str, str], dict]) -> Dict[Tuple[str, str], dict]:
    """(op, case) -> the fastest row that computes the op (baselines included; copies and floors not)."""
    best: Dict[Tuple[str, str], dict] = {}
    for r in rows:
        meta = cases.get((r["op"], r["case"]), {})
        if r["impl"] == COPY or r["impl"] in meta.get("not_the_op", ()) or r["impl"] == meta.get("floor"):
            continue
        key = (r["op"], r["case"])
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    return best


def check_lines(checks: List[dict]) -> List[str]:
    """The verdicts of one op, met ones counted, the others listed."""
    out = []
    targets = [c for c in checks if c["kind"] in ("target", "memory")]
    if targets:
        n = {s: sum(c["status"] == s for c in targets) for s in ("met", "missed", "unsure")}
        src = f" ({targets[0]['source']})" if targets[0]["source"] else ""
        out.append(f"targets{src}: {n['met']} met, {n['missed']} missed, {n['unsure']} unsure "
                   f"(interval crossing the target)")
        for c in targets:
            if c["status"] != "met":
                what = "peak memory / " if c["kind"] == "memory" else "x "
                value = fmt_x(c["median"]) if c["kind"] == "memory" else fmt_interval(c["median"], c["lo"], c["hi"])
                out.append(f"  {c['status']}: {c['case']}, {c['impl']} {what}{c['vs']} "
                           f"{'<=' if c['kind'] == 'memory' else '>='} {fmt_x(c['bound'])}: {value}")
    floors = [c for c in checks if c["kind"] == "floor"]
    if floors:
        faster = [c for c in floors if c["status"] == "faster"]
        if not faster:
            out.append(f"lower bound ({floors[0]['vs']}): no row is faster than it "
                       f"({len(floors)} rows; fastest {fmt_x(max(c['median'] for c in floors))}x)")
        for c in faster:
            out.append(f"  FASTER THAN ITS LOWER BOUND: {c['case']}, {c['impl']} x {c['vs']} = "
                       f"{fmt_interval(c['median'], c['lo'], c['hi'])}")
    return [textwrap.shorten(line, WIDTH - 1, placeholder=" ...") if len(line) >= WIDTH else line for line in out]


def op_table(op: str, rows: List[dict], checks: List[dict], peak_gbps: Optional[float] = None,
             cases: Sequence[dict] = ()) -> str:
    rows = _with_marks([r for r in rows if r["op"] == op], checks)
    cols = _columns(rows, peak_gbps, cases)
    load = {c["case"]: c.get("loadavg") for c in cases if c["op"] == op}
    sections = []
    for case in dict.fromkeys(r["case"] for r in rows):
        title = f"{case}:" if load.get(case) is None else f"{case} (load average {load[case]:.1f}):"
        sections.append((title, [[f(r) for _, f in cols] for r in rows if r["case"] == case]))
    table = render([c for c, _ in cols], sections)
    lines = check_lines([c for c in checks if c["op"] == op])
    return f"{op}\n{table}" + ("\n" + "\n".join(lines) if lines else "")


LEGEND = (
    "* = baseline. time: median of the rounds; ± = the 95 % bootstrap interval's larger distance from the median. "
    "speedup x B: median over rounds of B's time / this row's time in the same round (the implementations take "
    "turns, one call each per round, the order rotated). GB/s = minimum bytes / median time; % copy = the "
    "speedup against y.copy_(x) of the same minimum bytes, timed in the same rounds. launches, MB: kernels one "
    "eager call dispatches (a fastsd op counts as one) and the bytes of their inputs and outputs; peak MB: peak "
    "extra memory of one call. ! = target missed or faster than the lower bound; ? = interval crosses the target. "
    + ", ".join(f"{v} = {k}" for k, v in SHORT.items()) + "."
)


def format_report(report: dict) -> str:
    """Every op's table, then the summary and the legend."""
    rows, checks = report["rows"], report.get("checks", [])
    peak = report.get("environment", {}).get("peak_gbps")
    parts = [op_table(op, rows, checks, peak, report.get("cases", ())) for op in dict.fromkeys(r["op"] for r in rows)]
    parts.append("summary\n" + render(*summary(report)))
    parts.append(textwrap.fill(LEGEND, WIDTH - 10))
    return "\n\n".join(parts)


# --- the summary: one line per op --------------------------------------------------------------


def _span(values: List[float], fmt, unit: str = "") -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{fmt(lo)}{unit}" if fmt(lo) == fmt(hi) else f"{fmt(lo)}-{fmt(hi)}{unit}"


def summary_rows(report: dict) -> List[List[str]]:
    """Per op: the fastest fastsd backend(s) of its cases, their speedup against the eager and the
    torch.compile baselines and their % of copy bandwidth (ranges over the cases), the targets met."""
    cases = {(c["op"], c["case"]): c for c in report.get("cases", [])}
    out = []
    for op in dict.fromkeys(r["op"] for r in report["rows"]):
        best: Dict[str, dict] = {}
        for r in report["rows"]:
            if r["op"] == op and r["kind"] == "backend" and (
                    r["case"] not in best or r["median_ms"] < best[r["case"]]["median_ms"]):
                best[r["case"]] = r
        eager, compiled, copy = [], [], []
        for case, r in best.items():
            meta = cases.get((op, case), {})
            if meta.get("eager") in r["speedup"]:
                eager.append(r["speedup"][meta["eager"]])
            if meta.get("compiled") in r["speedup"]:
                compiled.append(r["speedup"][meta["compiled"]])
            if COPY in r["speedup"]:
                copy.append(100 * r["speedup"][COPY])
        eager_names = sorted({cases.get((op, c), {}).get("eager") or "-" for c in best})
        op_checks = [c for c in report.get("checks", []) if c["op"] == op and c["kind"] != "floor"]
        floors = [c for c in report.get("checks", []) if c["op"] == op and c["kind"] == "floor"]
        verdict = f"{sum(c['status'] == 'met' for c in op_checks)}/{len(op_checks)} met" if op_checks else "-"
        unsure = sum(c["status"] == "unsure" for c in op_checks)
        verdict += f", {unsure} unsure" if unsure else ""
        if any(c["status"] == "faster" for c in floors):
            verdict += ", BELOW FLOOR"
        out.append([op, ", ".join(dict.fromkeys(r["impl"] for r in best.values())),
                    _span(eager, fmt_x, "x") + (f" ({'/'.join(SHORT.get(n, n) for n in eager_names)})"
                                                if eager else ""),
                    _span(compiled, fmt_x, "x"), _span(copy, lambda v: fmt_pct(v)[:-1]) + ("%" if copy else ""),
                    verdict])
    return out


def summary(report: dict):
    cols = [Col("", "op", "<"), Col("", "fastsd", "<"), Col("speedup against", "eager", "<", md="x eager"),
            Col("", "torch.compile", "<", md="x torch.compile"), Col("", "% copy", "<", md="% copy"),
            Col("", "targets", "<", md="targets")]
    return cols, [(None, summary_rows(report))]


# --- the README section ------------------------------------------------------------------------


def markdown_tables(report: dict) -> str:
    """The summary table, then one table per op with its verdicts; the best row of each case in bold."""
    rows, checks = report["rows"], report.get("checks", [])
    cases = {(c["op"], c["case"]): c for c in report.get("cases", [])}
    best = best_rows(rows, cases)
    cols, sec = summary(report)
    parts = [render_md(cols, sec[0][1])]
    peak = report.get("environment", {}).get("peak_gbps")
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = _with_marks([r for r in rows if r["op"] == op], checks)
        ocols = _columns(op_rows, peak, report.get("cases", ()), markdown=True)
        body = [[f(r) for _, f in ocols] for r in op_rows]
        bold = [best.get((r["op"], r["case"])) is not None and best[r["op"], r["case"]]["impl"] == r["impl"]
                for r in op_rows]
        lines = check_lines([c for c in checks if c["op"] == op])
        parts.append(f"#### {op}\n\n" + render_md([c for c, _ in ocols], body, bold)
                     + ("\n\n" + "\n".join(f"  - {x.strip()}" if x.startswith("  ") else f"- {x}" for x in lines)
                        if lines else ""))
    return "\n\n".join(parts)


# --- comparing two reports ---------------------------------------------------------------------


def _speedups(report: dict) -> Dict[Tuple[str, str, str, str], Tuple[float, float, float]]:
    """(op, case, impl, baseline) -> (median, lo, hi) of every fastsd row's speedup (reports from
    before the intervals count their one number as the interval)."""
    out = {}
    for r in report["rows"]:
        if r["kind"] != "backend":
            continue
        for b, m in r["speedup"].items():
            if b == COPY:
                continue
            lo, hi = r.get("speedup_ci", {}).get(b, (m, m))
            out[r["op"], r["case"], r["impl"], b] = (m, lo, hi)
    return out


def _method_differs(old: dict, new: dict) -> List[str]:
    """A warning line where the two runs timed differently: thread count or clock (reports from
    before the clock was recorded timed on the wall clock). Speedups on 1 and 2 threads differ by
    themselves (a quiet run here: the per-pair loop 12x against 20x at 32 x 32)."""
    def method(report):
        env = report.get("environment", {})
        return env.get("torch_threads"), env.get("clock", "wall")

    (t0, c0), (t1, c1) = method(old), method(new)
    if (t0, c0) == (t1, c1):
        return []
    return [f"warning: the runs timed differently ({t0} torch threads, {c0} clock against {t1}, {c1}): "
            "their speedups differ by the method as well"]


def compare_reports(old: dict, new: dict, threshold: float = 1.1, within: float = 0.2) -> Tuple[str, int]:
    """Every fastsd speedup of ``new`` against the same one in ``old``.

    Decided on the intervals: a regression is a speedup whose whole new interval lies more than
    ``threshold`` times below the old interval (new hi x threshold < old lo); an improvement the
    reverse; anything else is the same within the noise of the two runs. Also counts the speedups
    whose medians are within ``within`` (20 %) of each other. Returns (text, 1 if any regression)."""
    a, b = _speedups(old), _speedups(new)
    keys = [k for k in b if k in a]
    lines, regressions, close, overlap = _method_differs(old, new), 0, 0, 0
    cols = [Col("", "case", "<"), Col("", "impl", "<"), Col("", "vs", "<"), Col("old", "x (95 %)", "<"),
            Col("new", "x (95 %)", "<"), Col("new/old", "", ">"), Col("", "verdict", "<")]
    by_op: Dict[str, List[List[str]]] = {}
    for k in keys:
        (m0, lo0, hi0), (m1, lo1, hi1) = a[k], b[k]
        if hi1 * threshold < lo0:
            verdict, regressions = "REGRESSION", regressions + 1
        elif lo1 > hi0 * threshold:
            verdict = "faster"
        else:
            verdict = "same"
        ratio = m1 / m0
        close += abs(ratio - 1) <= within
        overlap += lo1 <= hi0 and lo0 <= hi1
        if abs(ratio - 1) > within:
            verdict += f" (>{100 * within:.0f}%)"
        by_op.setdefault(k[0], []).append([k[1][:34], k[2], SHORT.get(k[3], k[3]), fmt_interval(m0, lo0, hi0),
                                            fmt_interval(m1, lo1, hi1), f"{ratio:.2f}", verdict])
    sections = [(f"{op}:", body) for op, body in by_op.items()]
    lines.append(render(cols, sections) if sections else "(no speedup in both reports)")
    lines.append(f"{close} of {len(keys)} fastsd speedups within {100 * within:.0f} % of each other (medians); "
                 f"intervals overlap for {overlap} of {len(keys)}; {regressions} regression(s) "
                 f"(new interval more than {threshold:.2f}x below the old one)")
    return "\n".join(lines), 1 if regressions else 0
