"""``python -m fastsd.bench.pair``: the same benchmark twice, quiet and beside CPU-bound load, and
how far apart their speedups are.

Run 1 is ``python -m fastsd.bench <args> --json DIR/quiet.json``; run 2 the same with ``--load N``
(N processes running ``while True: pass``, started by the bench and killed when it ends, also on an
error); then ``python -m fastsd.bench --compare DIR/quiet.json DIR/loaded.json`` prints every fastsd
speedup of both runs with its interval, the ratio between them, and how many are within 20 % of
each other. Each run is its own process, as a user's ``make bench`` is.

    python -m fastsd.bench.pair                      # --quick --no-plots --no-traffic, N = 2
    python -m fastsd.bench.pair --load 2 -- --quick --ops patch_swap losses icp
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = ["--quick", "--no-plots", "--no-traffic"]
    if "--" in argv:
        k = argv.index("--")
        argv, bench_args = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.pair", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", type=int, default=2, help="CPU-bound background processes of the loaded run (2)")
    p.add_argument("--out", default="bench-results", help="where the two JSON reports go (bench-results)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    quiet, loaded = os.path.join(args.out, "quiet.json"), os.path.join(args.out, "loaded.json")
    bench = [sys.executable, "-m", "fastsd.bench"] + bench_args
    runs = (("quiet run", ["--json", quiet]),
            (f"loaded run: {args.load} CPU-bound processes beside it", ["--load", str(args.load), "--json", loaded]))
    for title, extra in runs:
        print(f"=== {title}: {' '.join(bench[1:] + extra)}", flush=True)
        code = subprocess.call(bench + extra)
        if code:
            return code
    print("\n=== loaded against quiet", flush=True)
    return subprocess.call([sys.executable, "-m", "fastsd.bench", "--compare", quiet, loaded])


if __name__ == "__main__":
    raise SystemExit(main())
