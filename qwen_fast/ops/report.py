"""`qwen_fast.backends()`: per op, which backends were built and which can run here."""

import torch

from qwen_fast import _native

from ._dispatch import BACKENDS, Op


def backend_status(op: Op, backend: str) -> str:
    """ "usable on cpu, cuda", "built; ..." or why the backend cannot run this op here."""
    if backend not in op.impls:
        return "not implemented"
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    usable = [d.type for d in devices if op.problem(backend, d) is None]
    if usable:
        return "usable on " + ", ".join(usable)
    if backend == "cuda" and _native.has_kernel(op.native_op or op.name, "CUDA"):
        return "built; no CUDA device here"
    if backend == "flash_attn":  # the flash-attn package: why not on CUDA, or that it is there without a GPU
        return op.problem(backend, torch.device("cuda")) or "installed; no CUDA device here"
    return op.problem(backend, torch.device("cuda" if backend == "cuda" else "cpu")) or "unusable"


def backends(ops: dict[str, Op]) -> dict[str, dict[str, str]]:
    return {name: {backend: backend_status(op, backend) for backend in BACKENDS} for name, op in ops.items()}


def format_backends(table: dict[str, dict[str, str]]) -> str:
    """A plain-text table: one row per op, one column per backend."""
    rows = [["op", *BACKENDS]] + [[name, *(table[name][b] for b in BACKENDS)] for name in table]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
