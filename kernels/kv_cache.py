"""Triton reshape_and_cache: write new K/V rows into the paged caches.

Algorithm: program (t, h) owns token t's head h, a row of D elements. It reads slot = slot_mapping[t]; a negative
slot is padding and the program exits. Otherwise the row goes to block slot // block_size, offset
slot % block_size, of key_cache and value_cache [num_blocks, block_size, Hkv, D]. The row is loaded into registers
as one BLOCK_D vector (D rounded up to a power of two, masked) and stored; nothing else is held. Offsets are
computed in int64 (slot * strides passes 2^31 for large pools). key, value and the two caches are each read through
their own strides (head dims contiguous), so key and value may be slices of one fused projection and the caches
views of one interleaved buffer; slot_mapping is made contiguous by the launcher (N int64, a copy only when strided).
"""

import torch
import triton
import triton.language as tl

from .compile_spec import TRITON_DTYPE, CompileSpec


@triton.jit
def _reshape_and_cache_kernel(
    key,
    value,
    key_cache,
    value_cache,
    slot_mapping,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    kc_block_stride,
    kc_page_stride,
    kc_head_stride,
    vc_block_stride,
    vc_page_stride,
    vc_head_stride,
    block_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping + token)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        dims = tl.arange(0, BLOCK_D)
        mask = dims < HEAD_DIM
        k_src = token * k_token_stride + head * k_head_stride + dims
        k_dst = block * kc_block_stride + offset * kc_page_stride + head * kc_head_stride + dims
        tl.store(key_cache + k_dst, tl.load(key + k_src, mask=mask), mask=mask)
        v_src = token * v_token_stride + head * v_head_stride + dims
        v_dst = block * vc_block_stride + offset * vc_page_stride + head * vc_head_stride + dims
        tl.store(value_cache + v_dst, tl.load(value + v_src, mask=mask), mask=mask)


def _config(head_dim: int) -> dict:
    block_d = triton.next_power_of_2(head_dim)
    return {"BLOCK_D": block_d, "num_warps": 1 if block_d <= 128 else 2}


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Launcher; arguments as qwen_fast.reshape_and_cache (checked there). Mutates key_cache and value_cache."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    config = _config(head_dim)
    _reshape_and_cache_kernel[(num_tokens, num_heads)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping.contiguous(),  # the kernel reads slot t at offset t
        *key.stride()[:2],
        *value.stride()[:2],
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        key_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=config["BLOCK_D"],
        num_warps=config["num_warps"],
    )


def compile_specs() -> list[CompileSpec]:
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for head_dim in (64, 96, 128, 256):
            config = _config(head_dim)
            pointer = "*" + TRITON_DTYPE[dtype]
            signature = {name: pointer for name in ("key", "value", "key_cache", "value_cache")}
            signature["slot_mapping"] = "*i64"
            for name in "k_token k_head v_token v_head kc_block kc_page kc_head vc_block vc_page vc_head".split():
                signature[f"{name}_stride"] = "i64"
            signature |= {"block_size": "i32", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr"}
            specs.append(
                CompileSpec(
                    _reshape_and_cache_kernel,
                    signature,
                    {"HEAD_DIM": head_dim, "BLOCK_D": config["BLOCK_D"]},
                    num_warps=config["num_warps"],
                    label=f"{TRITON_DTYPE[dtype]} D={head_dim}",
                )
            )
    return specs
