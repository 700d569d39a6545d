"""`qwen-fast check`: the environment, which backends serve each op here, and a self-test of every op on every
usable backend against the reference (qwen_fast/cli/selftest.py, over the sample table qwen_fast/cli/samples).
Exit status 1 when any case fails.

    qwen-fast check                                   everything usable here (Triton on CPU: TRITON_INTERPRET=1)
    qwen-fast check --all --ops fused_topk            every sample and dtype of the table (the test suite's cases)
    qwen-fast check --ops fused_topk fused_moe --backends cpu torch --json check.json
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import qwen_fast
from qwen_fast.cli import selftest
from qwen_fast.ops.report import format_backends


def environment() -> dict[str, str]:
    """Versions, the GPU (name and compute capability) and the extension's load state, as strings."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = "none"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    return {
        "qwen_fast": qwen_fast.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "no",
        "triton": triton_version,
        "gpu": gpu,
        "extension": qwen_fast._native.LOAD_ERROR or "loaded",
    }


def report(env: dict[str, str] | None = None) -> str:
    """The environment and the per-op backends table (what `python -m qwen_fast` prints)."""
    env = env or environment()
    return (
        f"qwen_fast {env['qwen_fast']} on Python {env['python']}, {env['machine']}\n"
        f"torch {env['torch']} (CUDA build: {env['torch_cuda']}), triton {env['triton']}, GPU: {env['gpu']}\n"
        f"extension qwen_fast._C: {env['extension']}\n\n" + format_backends(qwen_fast.backends())
    )


def add_parser(subparsers) -> None:
    summary = "environment, backends, and a self-test of every op against the reference"
    parser = subparsers.add_parser("check", help=summary, description=__doc__)
    ops = list(selftest.CASES)
    parser.add_argument(
        "--ops", nargs="+", choices=ops, default=ops, metavar="OP", help=f"ops to test: {', '.join(ops)}"
    )
    parser.add_argument(
        "--backends", nargs="+", choices=qwen_fast.ops.BACKENDS, metavar="BACKEND",
        help=f"only these backends ({', '.join(qwen_fast.ops.BACKENDS)}); default: every one usable here",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="test only the backend `auto` picks per op and device")
    parser.add_argument(
        "--all", action="store_true", help="every sample of the table in every dtype (default: each op's first, fp32)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the environment and results as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    env = environment()
    print(report(env), end="\n\n", flush=True)
    cases = selftest.plan(args.ops, args.backends, args.quick, args.all)
    if not cases:
        print(
            f"qwen-fast check: no usable backend among {args.backends} for {', '.join(args.ops)} (the table above "
            "says why)",
            file=sys.stderr,
        )
        return 2
    print(f"self-test: {len(cases)} (op, backend, device, sample, dtype) cases against qwen_fast.reference")
    results = []
    for case in cases:
        results.append(selftest.run_case(*case))
        print(results[-1].line(), flush=True)
    failed = [r for r in results if r.status != "PASS"]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.json is not None:
        document = {"environment": env, "backends": qwen_fast.backends(), "results": [r.as_dict() for r in results]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0
