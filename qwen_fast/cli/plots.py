"""`qwen-fast bench`'s plots: per op, a grouped bar chart of each implementation's speedup over its baseline."""

import re
from pathlib import Path


def plot_speedups(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per op in `rows` (dicts with op, shape, impl, baseline, device, speedup; see qwen_fast/cli/bench.py):
    x = shapes in the order they ran, one bar per impl, log-scale speedup, 1x marked. Rows without a speedup, and
    shapes where only the baseline ran, are left out; an op with nothing left is not plotted. Returns the paths
    written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    written = []
    for op in dict.fromkeys(row["op"] for row in rows):
        compared = {row["shape"] for row in rows if row["op"] == op and row["impl"] != row["baseline"]}
        mine = [row for row in rows if row["op"] == op and row["speedup"] is not None and row["shape"] in compared]
        if not mine:
            continue
        shapes = list(dict.fromkeys(row["shape"] for row in mine))
        impls = list(dict.fromkeys(row["impl"] for row in mine))
        speedup = {(row["shape"], row["impl"]): row["speedup"] for row in mine}
        width = 0.8 / len(impls)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(shapes) + 2), 4.5))
        for i, impl in enumerate(impls):
            xs = [s for s, shape in enumerate(shapes) if (shape, impl) in speedup]
            ax.bar([x - 0.4 + (i + 0.5) * width for x in xs], [speedup[shapes[x], impl] for x in xs], width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup (x, log scale)")
        baselines = ", ".join(dict.fromkeys(row["baseline"] for row in mine))
        ax.set_title(f"{op}: speedup over {baselines}\n{mine[0]['device']}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', op)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
