"""The roofline part of bench/gpu_smoke.sh: time the shapes that matter on one GPU and print each one's fraction of
the roofline (ideal time = max(bytes / HBM bandwidth, FLOPs / bf16 dense peak) over the measured time).

    python -P bench/gpu_smoke.py            # on a CUDA machine, after the gpu tests (bench/gpu_smoke.sh)

Shapes (bf16; Qwen3-30B-A3B and Qwen3-235B-A22B):
- fused_experts at T = 1, 64, 4096 for both layers (E = 128, k = 8; H/I = 2048/768 and 4096/1536): bytes = the
  expected distinct experts' w13 + w2 under uniform routing plus the activations, FLOPs = 6 T k H I;
- paged decode, flash_attn_with_kvcache over pages of 16 (Hq/Hkv = 32/4, D = 128) at B = 1 L = 4K and 32K, B = 64
  L = 4K: bytes = the K/V read once;
- causal prefill attention, flash_attn_func at S = 8K (B = 1, D = 128, both models' heads): FLOPs = 2 S^2 Hq D.

Each shape runs on the triton backend (forced: auto would take flash-attn where it is installed), timed with CUDA
events over a captured CUDA graph of the call where it captures (no host sync on the path), else eagerly (said so).
Peaks: H100 SXM 3.35 TB/s, H200 4.8 TB/s, both 989 TFLOP/s bf16 dense; A100 80GB 2.04 TB/s, 312 TFLOP/s. An
unknown GPU uses H100's and says so. Exits non-zero at the first failure, with the shape that failed.
"""

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

PEAKS = {  # name fragment -> (HBM bytes/s, bf16 dense FLOP/s)
    "H200": (4.8e12, 989e12),
    "H100": (3.35e12, 989e12),
    "A100": (2.039e12, 312e12),
}
MODELS = {  # name -> (experts, top-k, hidden, moe_intermediate, q heads, kv heads)
    "30B-A3B": (128, 8, 2048, 768, 32, 4),
    "235B-A22B": (128, 8, 4096, 1536, 64, 4),
}
HEAD_DIM, BLOCK_SIZE, BYTES = 128, 16, 2  # bf16


def peaks(device_name: str) -> tuple[float, float, str]:
    """(bytes/s, FLOP/s, label) for a GPU name; H100's numbers, labelled as assumed, for any other GPU."""
    for fragment, (bandwidth, flops) in PEAKS.items():
        if fragment in device_name:
            return bandwidth, flops, fragment
    return (*PEAKS["H100"], f"unknown GPU {device_name!r}: H100's peaks assumed")


@dataclass(frozen=True)
class Shape:
    name: str
    bytes: float
    flops: float

    def ideal_seconds(self, bandwidth: float, flops: float) -> float:
        return max(self.bytes / bandwidth, self.flops / flops)

    def bound(self, bandwidth: float, flops: float) -> str:
        return "HBM" if self.bytes / bandwidth >= self.flops / flops else "compute"


def experts_shape(model: str, tokens: int) -> Shape:
    experts, topk, hidden, inter, _, _ = MODELS[model]
    touched = experts * (1 - (1 - topk / experts) ** tokens)  # expected distinct experts, uniform routing
    weights = touched * 3 * hidden * inter * BYTES  # w13 [2I, H] and w2 [H, I]
    activations = tokens * hidden * BYTES * 2 + tokens * topk * 8  # x in, out, weights + ids
    return Shape(f"fused_experts {model} T={tokens}", weights + activations, 6 * tokens * topk * hidden * inter)


def decode_shape(batch: int, context: int) -> Shape:
    _, _, _, _, heads_q, heads_kv = MODELS["30B-A3B"]
    kv = 2 * batch * context * heads_kv * HEAD_DIM * BYTES
    flops = 4 * batch * context * heads_q * HEAD_DIM
    return Shape(f"paged decode B={batch} L={context // 1024}K", kv, flops)


def prefill_shape(model: str, seqlen: int) -> Shape:
    _, _, _, _, heads_q, heads_kv = MODELS[model]
    qkvo = seqlen * (2 * heads_q + 2 * heads_kv) * HEAD_DIM * BYTES
    return Shape(f"prefill attention {model} S={seqlen // 1024}K", qkvo, 2 * seqlen * seqlen * heads_q * HEAD_DIM)


def shapes() -> list[Shape]:
    return (
        [experts_shape(model, tokens) for model in MODELS for tokens in (1, 64, 4096)]
        + [decode_shape(1, 4096), decode_shape(1, 32768), decode_shape(64, 4096)]
        + [prefill_shape(model, 8192) for model in MODELS]
    )


def _experts_call(model: str, tokens: int) -> Callable:
    import qwen_fast

    experts, topk, hidden, inter, _, _ = MODELS[model]
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * inter**-0.5
    weights, ids = torch.rand(tokens, experts, device="cuda").softmax(-1).topk(topk)
    return lambda: qwen_fast.fused_experts(x, w13, w2, weights, ids)


def _decode_call(batch: int, context: int) -> Callable:
    import qwen_fast

    _, _, _, _, heads_q, heads_kv = MODELS["30B-A3B"]
    blocks = context // BLOCK_SIZE
    k_cache = torch.randn(batch * blocks, BLOCK_SIZE, heads_kv, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(batch * blocks, device="cuda").view(batch, blocks).int()
    q = torch.randn(batch, 1, heads_q, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    lengths = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return lambda: qwen_fast.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=lengths, block_table=table, causal=True
    )


def _prefill_call(model: str, seqlen: int) -> Callable:
    import qwen_fast

    _, _, _, _, heads_q, heads_kv = MODELS[model]
    q = torch.randn(1, seqlen, heads_q, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, seqlen, heads_kv, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return lambda: qwen_fast.flash_attn_func(q, k, v, causal=True)


def calls() -> list[tuple[Shape, Callable[[], Callable]]]:
    """(shape, a function that builds its inputs and returns the call), in shapes()' order."""
    builders = [lambda m=m, t=t: _experts_call(m, t) for m in MODELS for t in (1, 64, 4096)]
    builders += [lambda b=b, c=c: _decode_call(b, c) for b, c in ((1, 4096), (1, 32768), (64, 4096))]
    builders += [lambda m=m: _prefill_call(m, 8192) for m in MODELS]
    return list(zip(shapes(), builders, strict=True))


def time_call(call: Callable, iterations: int = 20) -> tuple[float, str]:
    """Median-free mean seconds per call over `iterations`, from a CUDA graph replay when the call captures."""
    call()  # compile and warm up
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            call()  # warm up on the side stream, as capture requires
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(iterations):
                    call()
        run, mode = graph.replay, "cuda graph"
    except Exception as error:  # a host sync on the path cannot be captured: time it eagerly
        torch.cuda.synchronize()
        run, mode = (lambda: [call() for _ in range(iterations)]), f"eager ({type(error).__name__})"
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iterations, mode


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", file=sys.stderr)
        return 2
    import qwen_fast

    name = torch.cuda.get_device_name()
    bandwidth, flops, label = peaks(name)
    print(f"gpu_smoke roofline: {name} ({label}: {bandwidth / 1e12:.2f} TB/s, {flops / 1e12:.0f} TFLOP/s bf16)")
    print(f"{'shape':<36} {'measured us':>12} {'ideal us':>10} {'fraction':>9} {'bound':>8}  timing")
    started = time.time()
    with torch.no_grad(), qwen_fast.use_backend("triton"):
        for shape, build in calls():
            try:
                seconds, mode = time_call(build())
            except Exception as error:
                print(f"gpu_smoke: FAILED at {shape.name}: {type(error).__name__}: {error}", file=sys.stderr)
                return 1
            ideal = shape.ideal_seconds(bandwidth, flops)
            fraction = ideal / seconds if seconds > 0 and math.isfinite(seconds) else float("nan")
            print(
                f"{shape.name:<36} {seconds * 1e6:>12.1f} {ideal * 1e6:>10.1f} {fraction:>9.1%} "
                f"{shape.bound(bandwidth, flops):>8}  {mode}",
                flush=True,
            )
            torch.cuda.empty_cache()
    print(f"gpu_smoke roofline: done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
