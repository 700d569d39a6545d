"""The building blocks of the op sample table: seeded inputs, strided views, samples and an op's entry.

A sample builds an op's keyword arguments from an `Inputs`: every tensor is drawn on CPU from a generator seeded per
sample, then moved to the device under test and, for floating-point data, cast to the dtype under test, so every
(device, dtype) sees the same values. The views below (non-contiguous and stride-0 layouts) are built the same way
on every device. The memory a view skips holds values that are wrong but harmless: NaN for data, a valid decoy
for index tensors. A kernel that reads an index tensor as if it were contiguous then computes a wrong result,
which the comparison with the reference catches, instead of reading out of bounds.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen_fast import reference

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton's interpreter multiplies the raw bits of bf16 in tl.dot and rounds bf16 casts its own way (DESIGN.md).
INTERPRET_DTYPES = (torch.float32, torch.float16)


@functools.cache
def _cos_sin_table(head_dim: int, positions: int, yarn: bool, dtype: torch.dtype) -> torch.Tensor:
    """[positions, head_dim] on CPU, computed in fp32 and cast to `dtype`: rope_theta 1e6, with Qwen3-235B's YaRN
    (factor 4 over 32,768) when `yarn`. Cached: the 131,072-row tables are the slow part of a RoPE sample; the ops
    only read them."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768} if yarn else None
    return reference.compute_cos_sin_cache(head_dim, positions, 1e6, rope_scaling=scaling).to(dtype)


class Inputs:
    """Seeded tensors on `device`; floating-point data in `dtype` unless a call names another dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator().manual_seed(seed)

    def put(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A CPU tensor moved to the device; floating-point ones cast to `dtype` (default: the dtype under test)."""
        if tensor.is_floating_point():
            return tensor.to(self.device, dtype or self.dtype)
        return tensor.to(self.device, dtype or tensor.dtype)

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.put(torch.randn(*shape, generator=self.generator) * scale, dtype)

    def grid(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """N(0, 2^2) rounded to multiples of 1/64 (exact in fp16): equal values tie exactly, distinct ones are far
        apart in any softmax or sigmoid, so a top-k over them is the same in every implementation."""
        return self.put((torch.randn(*shape, generator=self.generator) * 128).round() / 64, dtype)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.put(torch.rand(*shape, generator=self.generator), dtype)

    def randint(self, low: int, high: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return self.put(torch.randint(low, high, shape, generator=self.generator), dtype)

    def perm(self, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return self.put(torch.randperm(n, generator=self.generator), dtype)

    def zeros(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.put(torch.zeros(*shape), dtype)

    def values(self, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Floating-point data from a (nested) list."""
        return self.put(torch.tensor(values, dtype=torch.float64), dtype)

    def ints(self, values: list, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return self.put(torch.tensor(values), dtype)

    def expert_ids(self, tokens: int, experts: int, topk: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """[T, k] distinct experts per token (k = E: a permutation per token), in fresh row-major memory (an empty
        slice would keep the row stride E, which opcheck's copies cannot take)."""
        ids = torch.rand(tokens, experts, generator=self.generator).argsort(-1)[:, :topk]
        ids = ids.clone(memory_format=torch.contiguous_format)
        return self.put(ids, dtype)

    def routing(self, tokens: int, experts: int, topk: int) -> dict:
        """topk_weights fp32 [T, k] and topk_ids int32 [T, k] from the reference router on random logits."""
        weights, ids = reference.topk_routing(torch.randn(tokens, experts, generator=self.generator), topk)
        return {"topk_weights": self.put(weights, torch.float32), "topk_ids": self.put(ids)}

    def rope_table(self, head_dim: int, positions: int, yarn: bool = False, dtype=torch.float32) -> torch.Tensor:
        """The cos/sin table in `dtype` (None: the dtype under test)."""
        return _cos_sin_table(head_dim, positions, yarn, dtype or self.dtype).to(self.device)


def _fill(tensor: torch.Tensor, decoy: int | None) -> float | int:
    if tensor.is_floating_point():
        return float("nan")
    if decoy is None:
        raise ValueError("an index tensor's view needs a decoy: a valid index that is the wrong one")
    return decoy


def spaced(tensor: torch.Tensor, dim: int = -1, decoy: int | None = None) -> torch.Tensor:
    """The same values with the stride of `dim` doubled: every other element of the memory is filler."""
    dim = dim % tensor.dim()
    filler = torch.full_like(tensor, _fill(tensor, decoy))
    return torch.stack((tensor, filler), dim=dim + 1).select(dim + 1, 0)


def expanded(row: torch.Tensor, shape: tuple[int, ...], decoy: int | None = None) -> torch.Tensor:
    """`row` (size 1 in the broadcast dims) expanded to `shape`: stride 0, over memory that holds filler where a
    contiguous read would look for the other rows."""
    memory = torch.full(shape, _fill(row, decoy), dtype=row.dtype, device=row.device)
    first = tuple(slice(0, 1) if size == 1 else slice(None) for size in row.shape)
    memory[first] = row
    return memory[first].expand(shape)


def relayout(tensor: torch.Tensor, dim0: int, dim1: int) -> torch.Tensor:
    """The same values stored with `dim0` and `dim1` swapped in memory (e.g. a matrix stored column-major)."""
    return tensor.transpose(dim0, dim1).contiguous().transpose(dim0, dim1)


def padded(tensor: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """The same values as the view [..., :D] of a tensor with D + pad columns: rows not 16-byte aligned."""
    memory = torch.full((*tensor.shape[:-1], tensor.shape[-1] + pad), float("nan"), dtype=tensor.dtype)
    memory = memory.to(tensor.device)
    memory[..., : tensor.shape[-1]] = tensor
    return memory[..., : tensor.shape[-1]]


@dataclass(frozen=True)
class Sample:
    """One set of an op's arguments. `interpret`: small enough for Triton's interpreter; `dtypes`: only these of
    the op's dtypes; `gpu`: only on CUDA tensors (sizes the CPU backends and the interpreter would take long on)."""

    name: str
    build: Callable[[Inputs], dict]
    interpret: bool = True
    dtypes: tuple[torch.dtype, ...] | None = None
    gpu: bool = False


@dataclass(frozen=True)
class OpSpec:
    """An op's entry in the table: its samples (the first is `qwen-fast check`'s case), the dtypes under test
    (for moe_align_block_size, the dtype of topk_ids), how outputs are compared with the reference.

    budget: attention outputs are held to flash-attn's error budget instead of the elementwise table.
    exact: tensors (argument names, or "output[i]") that must equal the reference's bit for bit on every backend
    (copies); exact_on_cpu: the same on CPU tensors only (GPUs may contract into FMAs). Integer tensors are always
    compared exactly. compiles_reference: the reference is also compiled with fullgraph=True in the tests (it can).
    opcheck: samples torch.library.opcheck runs on besides the first (arguments that take other paths)."""

    samples: tuple[Sample, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    interpret_dtypes: tuple[torch.dtype, ...] = INTERPRET_DTYPES
    budget: bool = False
    exact: tuple[str, ...] = ()
    exact_on_cpu: tuple[str, ...] = ()
    compiles_reference: bool = False
    opcheck: tuple[str, ...] = ()

    def sample(self, name: str | None = None) -> Sample:
        if name is None:
            return self.samples[0]
        for sample in self.samples:
            if sample.name == name:
                return sample
        raise ValueError(f"no sample {name!r}; samples: {', '.join(s.name for s in self.samples)}")

    def dtypes_for(self, sample: Sample, backend: str, device_type: str) -> tuple[torch.dtype, ...]:
        """The dtypes `sample` runs in on `backend`: the reference backend in the first dtype only (it is the
        reference), Triton's interpreter in interpret_dtypes, nothing where the sample does not run."""
        if sample.gpu and device_type != "cuda":
            return ()
        interpreted = backend == "triton" and device_type == "cpu"
        if interpreted and not sample.interpret:
            return ()
        dtypes = self.interpret_dtypes if interpreted else self.dtypes
        dtypes = tuple(d for d in dtypes if sample.dtypes is None or d in sample.dtypes)
        return dtypes[:1] if backend == "torch" else dtypes


def index_layout(name: str, build: Callable[[Inputs], dict]) -> Sample:
    """A sample of index tensors (ids, positions, slots, lengths, block tables, offsets) in a non-contiguous or
    stride-0 layout: how a kernel reads them does not depend on the data's dtype, so it runs in fp32 only."""
    return Sample(name, build, dtypes=(torch.float32,))
