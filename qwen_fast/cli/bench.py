"""`qwen-fast bench`: run the repository's pytest-benchmark suites, then plot each implementation's speedup.

    qwen-fast bench [BENCH_DIR] [--out DIR] [-k EXPR] [--quick]

BENCH_DIR (default ./bench) is the source checkout's bench/ directory: it is not in the wheel. Its suites
(bench_*.py) run in a subprocess, `python -P -m pytest <suites> --benchmark-json=<out>/bench.json`, with the same
interpreter; -k is passed to pytest. Then, from bench.json: a table of medians and speedups on stdout, and one
<out>/<op>.png per op (needs matplotlib: pip install 'qwen-fast[bench]').

Convention for a suite (every benchmark sets these four `benchmark.extra_info` keys; a benchmark without them is
listed and left out of the table and plots):
    op        what was timed, one plot each: "fused_experts", "flash_attn_func", "moe_block" (a whole layer), ...
    shape     the problem, the same string for every implementation timed on it: "T=64 bfloat16"
    impl      who ran it: "qwen_fast.<backend>" (qwen_fast.torch is the reference through the dispatch),
              "reference", "transformers.<experts implementation or router>", "torch_sdpa", "vllm", ...
    baseline  the impl this row's speedup is measured against, on the same op and shape: the torch reference, or
              the peer a user would otherwise run (transformers, torch SDPA)
speedup = median time of the baseline / median time of the impl (> 1: faster than the baseline); an (op, shape, impl)
timed twice keeps its faster median. A row whose baseline did not run (skipped, deselected by -k) is listed without a
speedup; a plot leaves out the shapes where only the baseline ran. `device` in extra_info titles the plots.
"""

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

CONVENTION = ("op", "shape", "impl", "baseline")
# --quick: at most 0.1 s and at least 2 rounds per benchmark (pytest-benchmark's defaults: 1 s, 5 rounds).
QUICK = ["--benchmark-max-time=0.1", "--benchmark-min-rounds=2"]
MISSING_EXTRA = "{module} is not installed: install the benchmark extra, pip install 'qwen-fast[bench]'"


def add_parser(subparsers) -> None:
    summary = "run the bench/ suites (pytest-benchmark), write bench.json and speedup plots"
    parser = subparsers.add_parser("bench", help=summary, description=__doc__)
    parser.add_argument(
        "bench_dir", nargs="?", type=Path, default=Path("bench"),
        help="directory of bench_*.py suites (default: ./bench, in the source checkout)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), metavar="DIR", help="default: bench-results/"
    )
    parser.add_argument("-k", metavar="EXPR", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer rounds: " + " ".join(QUICK))
    parser.set_defaults(run=run)


def fail(message: str) -> int:
    print(f"qwen-fast bench: {message}", file=sys.stderr)
    return 2


def load(path: Path) -> tuple[list[dict], list[str]]:
    """(rows, names of benchmarks lacking the convention) from pytest-benchmark's JSON. A row: op, shape, impl,
    baseline, device, median (seconds), speedup (None when its baseline did not run)."""
    rows, unnamed = [], []
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        if not all(isinstance(info.get(key), str) for key in CONVENTION):
            unnamed.append(bench["fullname"])
            continue
        row = {key: info[key] for key in CONVENTION}
        rows.append(row | {"device": info.get("device", "?"), "median": bench["stats"]["median"]})
    best: dict[tuple, float] = {}  # (op, shape, impl) -> the lowest median (a repeated row keeps its fastest)
    for row in rows:
        key = (row["op"], row["shape"], row["impl"])
        best[key] = min(best.get(key, row["median"]), row["median"])
    for row in rows:
        base = best.get((row["op"], row["shape"], row["baseline"]))
        row["speedup"] = None if base is None else base / row["median"]
    return rows, unnamed


def table(rows: list[dict]) -> str:
    """One line per row, grouped by op and then shape (each in the order it first ran)."""
    first = {key: i for i, row in reversed(list(enumerate(rows))) for key in ((row["op"],), (row["op"], row["shape"]))}
    rows = sorted(rows, key=lambda row: (first[(row["op"],)], first[(row["op"], row["shape"])]))
    cells = [("op", "shape", "impl", "median", "speedup", "baseline")]
    for row in rows:
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.3g}x"
        cells.append((row["op"], row["shape"], row["impl"], f"{row['median'] * 1e6:.1f} us", speedup, row["baseline"]))
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    right = (3, 4)  # the numbers
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in cells
    )


def run(args: argparse.Namespace) -> int:
    if not args.bench_dir.is_dir():
        return fail(
            f"benchmark directory {str(args.bench_dir)!r} not found: the suites live in the source checkout's bench/ "
            "(not in the installed package); run from the checkout or pass its path"
        )
    suites = sorted(args.bench_dir.glob("bench_*.py"))
    if not suites:
        return fail(f"no bench_*.py suites in {str(args.bench_dir)!r}")
    for module in ("pytest_benchmark", "matplotlib", "transformers"):
        if importlib.util.find_spec(module) is None:
            return fail(MISSING_EXTRA.format(module=module))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "bench.json"
    json_path.unlink(missing_ok=True)
    command = [sys.executable, "-P", "-m", "pytest", *map(str, suites), f"--benchmark-json={json_path}", "-q"]
    command += (["-k", args.k] if args.k else []) + (QUICK if args.quick else [])
    print(f"running: {shlex.join(command)}", flush=True)
    status = subprocess.run(command, check=False).returncode
    if not json_path.exists():
        return fail(f"pytest exited with status {status} and wrote no {json_path} (did any benchmark run?)")
    rows, unnamed = load(json_path)
    if unnamed:
        print(f"\n{len(unnamed)} benchmarks lack extra_info {'/'.join(CONVENTION)} (see --help), not plotted:")
        print("\n".join(f"  {name}" for name in unnamed))
    print(f"\n{table(rows)}\n\nwrote {json_path}")
    from qwen_fast.cli.plots import plot_speedups

    for path in plot_speedups(rows, args.out):
        print(f"wrote {path}")
    return status
