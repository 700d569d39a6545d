"""`qwen-fast check`'s self-test: every public op on small seeded fp32 inputs, on every backend usable here, against
`qwen_fast.reference`.

A case is the op's keyword arguments, built by one entry of CASES from an `Inputs` (seeded, on the device under
test). The backend runs on a copy of them inside `use_backend(backend)` and `record_backends()`; the reference runs
on another copy on CPU. Compared: the op's outputs and every tensor argument after the call (so the ops that write
a cache in place are checked on the cache): floating tensors with the test suite's fp32 tolerance, integer tensors
exactly. The record proves which backend ran.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import qwen_fast
from qwen_fast import reference
from qwen_fast.ops import OPS

# tests/numerics.py's fp32 row: (atol, rtol), a different summation order over a few thousand terms.
FP32_TOLERANCE = (2e-5, 2e-5)


class Inputs:
    """Seeded tensors on `device`: drawn on CPU from a generator seeded per op, so every device sees the same data."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device, self.generator = device, torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.generator) * scale).to(self.device)

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=self.device)

    def ints(self, values: list, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def routing(self, tokens: int, experts: int, topk: int) -> dict:
        """topk_weights fp32 [T, k] and topk_ids int32 [T, k] from the reference router on random logits."""
        weights, ids = reference.fused_topk(self.randn(tokens, experts), topk)
        return {"topk_weights": weights, "topk_ids": ids}

    def rope_table(self, head_dim: int, positions: int) -> torch.Tensor:
        return reference.compute_cos_sin_cache(head_dim, positions, 1e6).to(self.device)


# Shapes: T = 7 tokens, E = 8 experts (top-2), H = 32, I = 16, GQA 4 query / 2 KV heads of D = 32, pages of 4 slots.
# Each is small enough for Triton's interpreter, and awkward where it is cheap to be (odd T, a padded slot -1,
# sequences of unequal length, a shuffled block table).
CASES: dict[str, Callable[[Inputs], dict]] = {
    "fused_topk": lambda x: {"gating_output": x.randn(7, 16), "topk": 4},
    "moe_align_block_size": lambda x: {
        "topk_ids": x.routing(7, 8, 2)["topk_ids"], "block_size": 4, "num_experts": 8,
    },
    "fused_experts": lambda x: {
        "hidden_states": x.randn(7, 32), "w13": x.randn(8, 32, 32, scale=0.2), "w2": x.randn(8, 32, 16, scale=0.25),
        **x.routing(7, 8, 2),
    },
    "fused_moe": lambda x: {
        "hidden_states": x.randn(7, 32), "w13": x.randn(8, 32, 32, scale=0.2), "w2": x.randn(8, 32, 16, scale=0.25),
        "gating_output": x.randn(7, 8), "topk": 2,
    },
    "flash_attn_func": lambda x: {
        "q": x.randn(2, 9, 4, 32), "k": x.randn(2, 9, 2, 32), "v": x.randn(2, 9, 2, 32), "causal": True,
    },
    "flash_attn_varlen_func": lambda x: {
        "q": x.randn(12, 4, 32), "k": x.randn(12, 2, 32), "v": x.randn(12, 2, 32),
        "cu_seqlens_q": x.ints([0, 5, 12]), "cu_seqlens_k": x.ints([0, 5, 12]), "max_seqlen_q": 7, "max_seqlen_k": 7,
        "causal": True,
    },
    "flash_attn_with_kvcache": lambda x: {
        "q": x.randn(2, 1, 4, 32), "k_cache": x.randn(6, 4, 2, 32), "v_cache": x.randn(6, 4, 2, 32),
        "k": x.randn(2, 1, 2, 32), "v": x.randn(2, 1, 2, 32), "cache_seqlens": x.ints([5, 9]),
        "block_table": x.ints([[4, 1, 0], [2, 5, 3]]),
    },
    "reshape_and_cache": lambda x: {
        "key": x.randn(5, 2, 32), "value": x.randn(5, 2, 32), "key_cache": x.zeros(4, 4, 2, 32),
        "value_cache": x.zeros(4, 4, 2, 32), "slot_mapping": x.ints([3, 14, -1, 0, 9], torch.int64),
    },
    "rotary_embedding": lambda x: {
        "positions": x.ints([0, 3, 17, 40, 63], torch.int64), "query": x.randn(5, 4, 32), "key": x.randn(5, 2, 32),
        "cos_sin_cache": x.rope_table(32, 64),
    },
    "qk_norm_rope_and_cache": lambda x: {
        "query": x.randn(5, 4, 32), "key": x.randn(5, 2, 32), "value": x.randn(5, 2, 32),
        "q_norm_weight": x.randn(32), "k_norm_weight": x.randn(32), "eps": 1e-6,
        "positions": x.ints([0, 3, 17, 40, 63], torch.int64), "cos_sin_cache": x.rope_table(32, 64),
        "key_cache": x.zeros(4, 4, 2, 32), "value_cache": x.zeros(4, 4, 2, 32),
        "slot_mapping": x.ints([3, 14, -1, 0, 9], torch.int64),
    },
}  # fmt: skip


@dataclass
class Result:
    """One (op, backend, device) run: PASS or FAIL, the largest |backend - reference| over the compared tensors,
    the wall time of the one checked call (with a first call's compilation), the backends the record shows."""

    op: str
    backend: str
    device: str
    status: str = "FAIL"
    max_abs_error: float | None = None
    seconds: float | None = None
    ran: list[str] = field(default_factory=list)
    error: str = ""

    def line(self) -> str:
        error = "-" if self.max_abs_error is None else f"{self.max_abs_error:.2e}"
        seconds = "-" if self.seconds is None else f"{self.seconds * 1e3:.1f} ms"
        text = f"{self.status:4}  {self.op:24} {self.backend:6} {self.device:5} max abs err {error:>8}  {seconds:>10}"
        return f"{text}  {self.error}" if self.error else text

    def as_dict(self) -> dict:
        return asdict(self)


def _tensors(result, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for the op's outputs, then for every tensor argument (after the call: caches are written)."""
    outputs = result if isinstance(result, tuple) else (result,)
    named = [(f"output[{i}]", t) for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)]
    return named + [(name, t) for name, t in kwargs.items() if isinstance(t, torch.Tensor)]


def compare(got: list[tuple[str, torch.Tensor]], expected: list[tuple[str, torch.Tensor]]) -> tuple[float, str]:
    """(max abs error over all tensors, "" or the first mismatch): floats within FP32_TOLERANCE, integers exact."""
    atol, rtol = FP32_TOLERANCE
    worst, problem = 0.0, ""
    for (name, actual), (_, wanted) in zip(got, expected, strict=True):
        actual = actual.cpu()
        if actual.shape != wanted.shape or actual.dtype != wanted.dtype:
            got_type, wanted_type = f"{actual.dtype} {tuple(actual.shape)}", f"{wanted.dtype} {tuple(wanted.shape)}"
            return worst, f"{name}: got {got_type}, reference {wanted_type}"
        if not actual.numel():
            continue
        diff = (actual.double() - wanted.double()).abs()
        worst = max(worst, diff.max().item())
        if actual.is_floating_point():
            bad = ~(diff <= atol + rtol * wanted.double().abs())
        else:
            bad = diff != 0
        if bad.any() and not problem:
            index = tuple(bad.nonzero()[0].tolist())
            problem = f"{name}{list(index)}: {actual[index].item():.6g} != reference {wanted[index].item():.6g}"
    return worst, problem


def run_case(op: str, backend: str, device: torch.device) -> Result:
    """Run `op` on `backend` with the tensors on `device` and check it against the reference."""
    result = Result(op, backend, device.type)
    try:
        expected_kwargs = CASES[op](Inputs(torch.device("cpu")))
        expected = _tensors(getattr(reference, op)(**expected_kwargs), expected_kwargs)
        kwargs = CASES[op](Inputs(device))
        with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
            start = time.perf_counter()
            output = getattr(qwen_fast, op)(**kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.seconds = time.perf_counter() - start
    except Exception as error:  # a crash (of the op on this backend, or of the reference) fails this case only
        result.error = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        return result
    result.ran = sorted({b for name, b in calls if name == op})
    result.max_abs_error, mismatch = compare(_tensors(output, kwargs), expected)
    if result.ran != [backend]:
        result.error = f"the record shows {op} ran on {result.ran or 'nothing'}, not {backend}"
    else:
        result.error = mismatch
    result.status = "FAIL" if result.error else "PASS"
    return result


def plan(ops: list[str], backends: list[str] | None, quick: bool) -> list[tuple[str, str, torch.device]]:
    """(op, backend, device) for every backend usable here (or `auto`'s choice alone when quick), on CPU tensors and,
    with a GPU, on CUDA tensors."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    cases = []
    for device in devices:
        for op in ops:
            usable = [b for b in OPS[op].impls if OPS[op].problem(b, device) is None]
            if quick:
                usable = [OPS[op].select(device)]
            cases += [(op, b, device) for b in usable if backends is None or b in backends]
    return cases
