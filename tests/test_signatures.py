"""Each function that qwen_fast says it mirrors has its peer's signature: the same parameter names in the same order,
the same kinds (positional or keyword-only) and the same defaults, so that a call written for flash-attn or vLLM
means the same thing here. The peers' signatures are written down below, with the version and file they come from;
a drift on either side fails this test. qwen_fast may add keyword-only parameters after the peer's, and may give a
default to a parameter the peer requires (every call written for the peer still means the same).
"""

import inspect

import pytest

import qwen_fast

# name in qwen_fast -> (where the peer's signature was read, the peer's def line)
PEERS = {
    # flash-attn 2.8.3, flash_attn/flash_attn_interface.py (read at tag v2.8.3)
    "flash_attn_func": (
        "flash-attn 2.8.3 (tag v2.8.3) flash_attn/flash_attn_interface.py",
        "def f(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
        "alibi_slopes=None, deterministic=False, return_attn_probs=False): ...",
    ),
    "flash_attn_varlen_func": (
        "flash-attn 2.8.3 (tag v2.8.3) flash_attn/flash_attn_interface.py",
        "def f(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, "
        "causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, "
        "return_attn_probs=False, block_table=None): ...",
    ),
    # checked against flash_attn/flash_attn_interface.py at Dao-AILab/flash-attention 00530025 (__version__ 2.8.3)
    "flash_attn_with_kvcache": (
        "flash-attn 2.8.3 flash_attn_interface.py",
        "def f(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None, "
        "cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False, "
        "window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0, "
        "return_softmax_lse=False): ...",
    ),
    # vLLM 0.10.1.1 (the PyPI sdist), vllm/model_executor/layers/fused_moe/fused_moe.py
    "fused_topk": (
        "vLLM 0.10.1.1 vllm/model_executor/layers/fused_moe/fused_moe.py",
        "def f(hidden_states, gating_output, topk, renormalize, indices_type=None): ...",
    ),
    "grouped_topk": (
        "vLLM 0.10.1.1 vllm/model_executor/layers/fused_moe/fused_moe.py",
        "def f(hidden_states, gating_output, topk, renormalize, num_expert_group=0, topk_group=0, "
        "scoring_func='softmax', e_score_correction_bias=None): ...",
    ),
    "fused_experts": (
        "vLLM 0.10.1.1 vllm/model_executor/layers/fused_moe/fused_moe.py",
        "def f(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False, activation='silu', is_act_and_mul=True, "
        "apply_router_weight_on_input=False, use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, "
        "use_int4_w4a16=False, use_mxfp4_w4a4=False, per_channel_quant=False, global_num_experts=-1, "
        "expert_map=None, w1_scale=None, w2_scale=None, w1_zp=None, w2_zp=None, a1_scale=None, a2_scale=None, "
        "block_shape=None, allow_deep_gemm=False, allow_cutlass_block_scaled_grouped_gemm=False, w1_bias=None, "
        "w2_bias=None): ...",
    ),
    "fused_moe": (
        "vLLM 0.10.1.1 vllm/model_executor/layers/fused_moe/fused_moe.py",
        "def f(hidden_states, w1, w2, gating_output, topk, renormalize, inplace=False, activation='silu', "
        "is_act_and_mul=True, use_grouped_topk=False, num_expert_group=None, topk_group=None, "
        "custom_routing_function=None, use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, "
        "use_int4_w4a16=False, use_mxfp4_w4a4=False, per_channel_quant=False, global_num_experts=-1, "
        "expert_map=None, w1_scale=None, w2_scale=None, w1_zp=None, w2_zp=None, a1_scale=None, a2_scale=None, "
        "block_shape=None, w1_bias=None, w2_bias=None): ...",
    ),
    # vLLM 0.10.1.1, vllm/model_executor/layers/fused_moe/moe_align_block_size.py
    "moe_align_block_size": (
        "vLLM 0.10.1.1 vllm/model_executor/layers/fused_moe/moe_align_block_size.py",
        "def f(topk_ids, block_size, num_experts, expert_map=None, pad_sorted_ids=False): ...",
    ),
    # vLLM 0.10.1.1 (the PyPI sdist), vllm/_custom_ops.py (unchanged on main at 0002bde5 but for a later
    # interleaved_v=False, which qwen_fast takes keyword-only). qwen_fast.reshape_and_cache takes vLLM's
    # reshape_and_cache signature but writes reshape_and_cache_flash's layout; vLLM's 5-D key cache is refused.
    "reshape_and_cache": (
        "vLLM 0.10.1.1 vllm/_custom_ops.py reshape_and_cache",
        "def f(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale): ...",
    ),
    "reshape_and_cache_flash": (
        "vLLM 0.10.1.1 vllm/_custom_ops.py reshape_and_cache_flash",
        "def f(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale): ...",
    ),
    "rotary_embedding": (  # key may be None; rope_dim_offset and inverse are recent additions (main, 2026)
        "vLLM main at commit 0002bde560dd9adcabb28b0da32f47d4c020e799, vllm/_custom_ops.py",
        "def f(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False): ...",
    ),
}


def _peer_signature(stub: str) -> inspect.Signature:
    namespace: dict = {}
    exec(stub, namespace)  # the stub is a literal above, not input
    return inspect.signature(namespace["f"])


def _describe(parameter: inspect.Parameter, peer: inspect.Parameter) -> tuple:
    default = parameter.default if peer.default is not inspect.Parameter.empty else inspect.Parameter.empty
    return parameter.name, parameter.kind, default


@pytest.mark.parametrize("name", sorted(PEERS))
def test_signature_matches_peer(name):
    source, stub = PEERS[name]
    peer = list(_peer_signature(stub).parameters.values())
    ours = list(inspect.signature(getattr(qwen_fast, name)).parameters.values())
    assert [_describe(p, q) for p, q in zip(ours, peer, strict=False)] == [_describe(q, q) for q in peer], (
        f"{name} differs from {source}"
    )
    assert len(ours) >= len(peer), f"{name} lacks {[q.name for q in peer[len(ours) :]]} of {source}"
    extra = ours[len(peer) :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra), (
        f"{name}: parameters after {source}'s must be keyword-only, got {[p.name for p in extra]}"
    )
