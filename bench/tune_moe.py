"""Tune the Triton fused_experts tiles (kernels/moe_gemm.py) for one MoE layer shape on this device; write them as data.

    python bench/tune_moe.py --experts 128 --hidden 2048 --inter 768 --topk 8 --dtype bfloat16 \\
        [--tokens 1 4 16 64 256 1024 4096] [--out-dir DIR] [--dry-run] [--block-m 16 32 ...]

Writes (merging into what is there; a tuned T replaces the old entry for that T)
`<out-dir>/moe_gemm/<device name>.json`, the table qwen_fast.configs reads; --out-dir defaults to
$QWEN_FAST_CONFIG_DIR when set, else this source tree's qwen_fast/configs (shipped with the package).

Per T: N(0, 1) router logits through the reference routing (topk_routing) (uniform routing: a real model's skew is not
modelled), N(0, 1/fan_in) weights. Search, per BLOCK_M in --block-m: the two GEMMs are separate launches, so given
BLOCK_M their tiles are independent; GEMM 1 (gate_up) tiles are timed with GEMM 2 at the heuristic's tiles (or the
first --block-n/--block-k/... choice when those are outside the lists), then GEMM 2 (down) tiles with GEMM 1's best.
The heuristic's own config is always timed too, so the entry written is never slower than it in this measurement,
and the speed-up over it is printed. A candidate is the whole fused_experts call (alignment, both GEMMs, combine)
with one config; each is run once and checked against qwen_fast.reference.fused_experts with the test suite's
tolerance (tests/numerics.py) before it is timed; a failing or non-compiling candidate is reported and dropped. On
CUDA each candidate's two kernels are first compiled for the device's arch and read with cuobjdump as
`python -m qwen_fast.gpu_check` does: one that spills or overflows shared memory is dropped, so a table written here
passes that check on this arch (compilation is then done twice per tile config: once here, once to run).

Pruned before timing (counted in the output): BLOCK_M more than twice max(16, next_pow2(R)), R = T*k / min(E, T*k)
the rows per active expert under uniform routing (such a block is mostly padding); a BLOCK_N or BLOCK_K past
max(16, next_pow2(dim)) of the dimension it tiles; an estimated shared memory of
stages * (BLOCK_M + B*BLOCK_N) * BLOCK_K * itemsize (B = 2 weight tiles for gate_up, 1 for down) past the device's
opt-in limit (sm_90's 227 KiB on CPU); fp32 accumulators of B*BLOCK_M*BLOCK_N / (32*warps) > 128 registers per
thread (half of the 255 a thread may hold; operands and addresses need the rest, or the tile spills).

Timing: on CUDA triton.testing.do_bench (25 ms warm-up, 100 ms of runs, median). On CPU the kernels run only under
TRITON_INTERPRET=1 and each candidate is timed once with a wall clock: a smoke test of the mechanics, and the
times mean nothing (the script says so). bf16 is refused there (the interpreter cannot run bf16 tl.dot).

Size, Qwen3-30B-A3B (E=128, H=2048, I=768, k=8, bf16), default space (--dry-run with sm_90's limit): 26 to 34
gate_up and 34 to 36 down tiles per BLOCK_M after pruning; up to 139 candidates for each T <= 256 (BLOCK_M 16, 32)
and 265 for T = 1024, 4096: 1,225 for the 7 default T. do_bench spends about 0.125 s on each (25 + 100 ms), plus a
first compile of each distinct tile config (shared across T): the GPU time is not measured (no GPU was available).
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton

import qwen_fast
from qwen_fast import configs, gpu_check
from qwen_fast.kernels import moe_gemm
from qwen_fast.kernels.compile_spec import device_arch, num_sms, specialization_key, unique
from qwen_fast.ops.moe import triton_fused_experts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from numerics import assert_close  # noqa: E402  (the test suite's one tolerance table)

WEIGHT_TILES = {"gate_up": 2, "down": 1}  # weight tiles per K step: gate and up rows, or w2 rows
MAX_ACCUMULATOR_REGISTERS = 128


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, required=True, help="E, number of experts")
    parser.add_argument("--hidden", type=int, required=True, help="H, hidden size")
    parser.add_argument("--inter", type=int, required=True, help="I, moe_intermediate_size")
    parser.add_argument("--topk", type=int, required=True, help="k, experts per token")
    parser.add_argument("--dtype", choices=list(moe_gemm.DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096], help="T values")
    tiles = moe_gemm.TILE_SIZES
    parser.add_argument("--block-m", type=int, nargs="+", choices=tiles, default=[16, 32, 64, 128], metavar="M")
    parser.add_argument("--block-n", type=int, nargs="+", choices=tiles, default=[32, 64, 128], metavar="N")
    parser.add_argument("--block-k", type=int, nargs="+", choices=tiles, default=[64, 128], metavar="K")
    parser.add_argument("--warps", type=int, nargs="+", choices=moe_gemm.WARPS, default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", choices=moe_gemm.STAGES, default=[2, 3, 4], metavar="S")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    default_dir = Path(os.environ.get(configs.ENV_DIR) or ROOT / "qwen_fast" / "configs")
    parser.add_argument("--out-dir", type=Path, default=default_dir, help=f"default {default_dir}")
    parser.add_argument("--dry-run", action="store_true", help="print the candidate counts per T, time nothing")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _cap(dim: int) -> int:
    """The largest useful tile along a dimension of `dim` elements."""
    return max(16, triton.next_power_of_2(dim))


def gemm_tiles(args, gemm: str, block_m: int, n_dim: int, k_dim: int, smem_limit: int) -> tuple[list[dict], int]:
    """(kept tile dicts, number pruned) for one GEMM at one BLOCK_M."""
    itemsize = moe_gemm.DTYPES[args.dtype].itemsize
    kept, pruned = [], 0
    for n, k, warps, stages in itertools.product(args.block_n, args.block_k, args.warps, args.stages):
        smem = stages * (block_m + WEIGHT_TILES[gemm] * n) * k * itemsize
        registers = WEIGHT_TILES[gemm] * block_m * n // (32 * warps)
        if n > _cap(n_dim) or k > _cap(k_dim) or smem > smem_limit or registers > MAX_ACCUMULATOR_REGISTERS:
            pruned += 1
        else:
            kept.append({"BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages})
    return kept, pruned


def plan(args, num_tokens: int, smem_limit: int) -> tuple[list[tuple[int, list, list]], int]:
    """([(BLOCK_M, gate_up tiles, down tiles)], number of GEMM tile configs pruned) for one T."""
    pairs = num_tokens * args.topk
    rows = -(-pairs // min(args.experts, pairs))  # rows per active expert under uniform routing
    heights = [m for m in args.block_m if m <= 2 * _cap(rows)]
    per_gemm = len(args.block_n) * len(args.block_k) * len(args.warps) * len(args.stages)
    pruned, found = 2 * per_gemm * (len(args.block_m) - len(heights)), []
    for block_m in heights:
        gate_up, cut_g = gemm_tiles(args, "gate_up", block_m, args.inter, args.hidden, smem_limit)
        down, cut_d = gemm_tiles(args, "down", block_m, args.hidden, args.inter, smem_limit)
        pruned += cut_g + cut_d
        if gate_up and down:
            found.append((block_m, gate_up, down))
    return found, pruned


def make_inputs(args, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """hidden [T, H], w13 [E, 2I, H], w2 [E, H, I] in --dtype; fp32 weights [T, k] and int32 ids [T, k]."""
    dtype, e, h, i = moe_gemm.DTYPES[args.dtype], args.experts, args.hidden, args.inter
    x = torch.randn(num_tokens, h, device=device).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, device=device) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device=device) / i**0.5).to(dtype)
    weights, ids = qwen_fast.reference.topk_routing(torch.randn(num_tokens, e, device=device), args.topk)
    return x, w13, w2, weights, ids


def describe(config: dict) -> str:
    def tiles(t):
        return f"N{t['BLOCK_N']} K{t['BLOCK_K']} w{t['num_warps']} s{t['num_stages']}"

    return f"M{config['BLOCK_M']} gate_up[{tiles(config['gate_up'])}] down[{tiles(config['down'])}]"


class SpillCheck:
    """The first problem `python -m qwen_fast.gpu_check` would report for a candidate's two GEMM kernels compiled for
    sm_<arch> (a register spill, local memory, shared memory past the limit), or None; memoised per kernel config.
    The same compile-and-cuobjdump steps as gpu_check, so that the tuner never writes an entry that check rejects."""

    def __init__(self, arch: int):
        self.arch, self.found = arch, {}

    def problems(self, spec) -> list[str]:
        usages = gpu_check.spec_usages(spec, self.arch, spec.label, gpu_check.cuobjdump())
        return [problem for usage in usages for problem in usage.problems()]

    def __call__(self, dtype: torch.dtype, config: dict) -> str | None:
        found = []
        for spec in unique(moe_gemm.gemm_specs(dtype, config, (self.arch,)), self.arch):
            key = specialization_key(spec, self.arch)
            if key not in self.found:
                self.found[key] = self.problems(spec)
            found += [f"{spec.name} sm_{self.arch}: {p}" for p in self.found[key]]
        return found[0] if found else None


class Timer:
    """Times candidate configs once each (memoised), after one checked run against the reference."""

    def __init__(self, inputs: tuple, expected: torch.Tensor, spill_check: SpillCheck | None):
        self.inputs, self.expected, self.spill_check = inputs, expected, spill_check
        self.times: dict[str, tuple[float, dict]] = {}

    def run(self, config: dict) -> torch.Tensor:
        return triton_fused_experts(*self.inputs, config=config)

    def __call__(self, config: dict) -> float:
        key = json.dumps(config, sort_keys=True)
        if key in self.times:
            return self.times[key][0]
        try:
            if self.spill_check and (problem := self.spill_check(self.expected.dtype, config)):
                raise ValueError(problem)
            assert_close(self.run(config), self.expected)
            if self.spill_check is None:  # the interpreter on CPU
                start = time.perf_counter()
                self.run(config)
                elapsed = (time.perf_counter() - start) * 1e3
            else:
                import triton.testing

                elapsed = triton.testing.do_bench(lambda: self.run(config), warmup=25, rep=100, return_mode="median")
        except Exception as error:  # a candidate that does not compile, launch or match is dropped, with the reason
            print(f"  dropped {describe(config)}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            elapsed = math.inf
        self.times[key] = (elapsed, config)
        return elapsed


def tune(args, num_tokens: int, device: torch.device, found: list, spill_check) -> tuple[dict, float, float, int]:
    """(best entry, its ms, the heuristic's ms, candidates timed) for one T."""
    inputs = make_inputs(args, num_tokens, device)
    timer = Timer(inputs, qwen_fast.reference.fused_experts(*inputs), spill_check)
    dtype, arch = moe_gemm.DTYPES[args.dtype], device_arch(device)
    shape = (args.experts, args.hidden, args.inter, dtype, arch, num_sms(device))
    heuristic = moe_gemm.heuristic_config(num_tokens, args.topk, *shape)
    baseline = timer(heuristic)
    for block_m, gate_up, down in found:
        same = block_m == heuristic["BLOCK_M"]
        seed_down = heuristic["down"] if same else moe_gemm._config(block_m, dtype, arch)["down"]
        seed_down = seed_down if seed_down in down else down[0]
        best_g = min(gate_up, key=lambda g: timer({"BLOCK_M": block_m, "gate_up": g, "down": seed_down}))
        min(down, key=lambda d: timer({"BLOCK_M": block_m, "gate_up": best_g, "down": d}))
    best_ms, best = min(timer.times.values(), key=lambda pair: pair[0])
    if math.isinf(best_ms):
        raise SystemExit(f"tune_moe: every candidate failed at T={num_tokens} (see the messages above)")
    return best, best_ms, baseline, len(timer.times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if min(args.tokens) < 1:
        raise SystemExit(f"tune_moe: --tokens must be >= 1, got {args.tokens}")
    spill_check = None
    if device.type == "cuda":
        smem_limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        major, minor = torch.cuda.get_device_capability(device)
        spill_check = SpillCheck(10 * major + minor)
    else:
        if not (interpret or args.dry_run):
            raise SystemExit("tune_moe: on CPU the Triton kernels run only under TRITON_INTERPRET=1")
        if args.dtype == "bfloat16" and not args.dry_run:
            raise SystemExit("tune_moe: the Triton interpreter cannot run bf16 tl.dot; use --dtype float32/float16")
        smem_limit = gpu_check.SHARED_LIMIT[90]
    dtype = moe_gemm.DTYPES[args.dtype]
    shape = moe_gemm.shape_key(args.experts, args.hidden, args.inter, args.topk, dtype)
    name = configs.device_name(device)
    path = configs.config_path(args.out_dir, "moe_gemm", name)
    print(f"tune_moe: {shape} on {name} (torch {torch.__version__}), writing {path}")
    if device.type == "cpu" and not args.dry_run:
        print("tune_moe: CPU under TRITON_INTERPRET=1: a smoke test of the mechanics; these times mean nothing, and")
        print("tune_moe: candidates are not compiled for a GPU, so spills are not checked (gpu_check does that)")
    torch.manual_seed(args.seed)
    for num_tokens in args.tokens:
        found, pruned = plan(args, num_tokens, smem_limit)
        count = sum(len(g) + len(d) - 1 for _, g, d in found) + 1
        sizes = ", ".join(f"M{m}: {len(g)} gate_up + {len(d)} down" for m, g, d in found)
        print(f"T={num_tokens}: up to {count} candidates ({sizes}); {pruned} GEMM tile configs pruned", flush=True)
        if args.dry_run:
            continue
        best, best_ms, baseline, timed = tune(args, num_tokens, device, found, spill_check)
        configs.write_entries(path, moe_gemm.validate_config, shape, {num_tokens: best})
        speedup = f"{baseline / best_ms:.2f}x" if math.isfinite(baseline) else "heuristic failed"
        print(
            f"T={num_tokens}: {timed} timed; best {describe(best)} {best_ms:.4f} ms, heuristic {baseline:.4f} ms "
            f"({speedup})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
