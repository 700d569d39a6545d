"""qwen_fast.reference.rope and .norm against transformers' Qwen3 / Qwen3-MoE rotary embedding, RMSNorm, attention."""

import functools
import math

import pytest
import torch
from backends import backend_params
from numerics import assert_close, assert_within_budget
from transformers import Qwen3Config, Qwen3MoeConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3_moe import modeling_qwen3_moe

import qwen_fast
from qwen_fast.cli.samples import Inputs
from qwen_fast.cli.samples.rope import qk_norm_rope_and_cache_args
from qwen_fast.reference.attention import flash_attn_func
from qwen_fast.reference.kv_cache import reshape_and_cache as reference_reshape_and_cache
from qwen_fast.reference.norm import rms_norm
from qwen_fast.reference.rope import apply_rotary_emb, compute_cos_sin_cache

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# family -> (config class, attention class, rotary embedding class, RMSNorm class, apply_rotary_pos_emb)
FAMILIES = {
    "qwen3_moe": (
        Qwen3MoeConfig, modeling_qwen3_moe.Qwen3MoeAttention, modeling_qwen3_moe.Qwen3MoeRotaryEmbedding,
        modeling_qwen3_moe.Qwen3MoeRMSNorm, modeling_qwen3_moe.apply_rotary_pos_emb,
    ),
    "qwen3": (
        Qwen3Config, modeling_qwen3.Qwen3Attention, modeling_qwen3.Qwen3RotaryEmbedding,
        modeling_qwen3.Qwen3RMSNorm, modeling_qwen3.apply_rotary_pos_emb,
    ),
}  # fmt: skip

QWEN3_235B_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
ROPES = {  # name -> (rope_parameters without rope_theta, max_position_embeddings)
    "default": ({"rope_type": "default"}, 40960),
    "yarn_qwen3_235b": (QWEN3_235B_YARN, 131072),
    "yarn_no_truncate": ({**QWEN3_235B_YARN, "truncate": False}, 131072),
    "yarn_betas": ({**QWEN3_235B_YARN, "beta_fast": 16, "beta_slow": 2}, 131072),
    "yarn_attention_factor": ({**QWEN3_235B_YARN, "attention_factor": 1.0}, 131072),
    "yarn_mscale": ({**QWEN3_235B_YARN, "mscale": 0.707, "mscale_all_dim": 1.0}, 131072),
    "yarn_factor8": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}, 32768),
}
POSITIONS = [0, 1, 2, 7, 97, 4095, 4096, 32767, 32768, 40959, 131071]


def _config(family, head_dim=64, rope="default", theta=1e6, heads_q=4, heads_kv=2, dtype=torch.float32):
    rope_parameters, max_positions = ROPES[rope]
    return FAMILIES[family][0](
        hidden_size=96, num_attention_heads=heads_q, num_key_value_heads=heads_kv, head_dim=head_dim,
        max_position_embeddings=max_positions, rope_parameters={**rope_parameters, "rope_theta": theta},
        attn_implementation="sdpa", dtype=dtype,
    )  # fmt: skip


@functools.cache
def _long_cache(head_dim, rope, dtype=torch.float32, theta=1e6):
    """compute_cos_sin_cache over 131072 positions, shared by the tests (it is the slow part)."""
    return compute_cos_sin_cache(head_dim, 131072, rope_scaling={**ROPES[rope][0], "rope_theta": theta}, dtype=dtype)


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("head_dim, theta", [(64, 1e4), (128, 1e6)])
def test_inv_freq_and_attention_factor_match_rope_init_functions(head_dim, theta, rope):
    """Recover inv_freq (the angle at position 1) and the attention factor (the radius) from the public cache."""
    config = _config("qwen3_moe", head_dim, rope, theta)
    init = ROPE_INIT_FUNCTIONS.get(config.rope_parameters["rope_type"])
    if init is None:
        init = modeling_qwen3_moe.Qwen3MoeRotaryEmbedding.compute_default_rope_parameters
    inv_freq, attention_factor = init(config)
    cos, sin = compute_cos_sin_cache(head_dim, 2, rope_scaling=config.rope_parameters, dtype=torch.float64).chunk(2, -1)
    assert_close(torch.atan2(sin[1], cos[1]).float(), inv_freq)
    assert_close(torch.hypot(sin, cos).float(), torch.full_like(cos, attention_factor, dtype=torch.float32))
    if rope == "yarn_qwen3_235b":
        assert attention_factor == pytest.approx(0.1 * math.log(4) + 1)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cos_sin_cache_matches_rotary_embedding_module(family, rope, dtype):
    """Same fp32 operations as the module (inv_freq, p * inv_freq, cos/sin, x attention factor, cast): same bits."""
    head_dim = 128
    config = _config(family, head_dim, rope, dtype=dtype)
    rotary = FAMILIES[family][2](config)
    positions = torch.tensor([p for p in POSITIONS if p < config.max_position_embeddings])
    cos, sin = rotary(torch.zeros(1, dtype=dtype), positions[None])  # [1, P, D], halves duplicated
    cache = _long_cache(head_dim, rope, dtype)
    half = head_dim // 2
    assert cache.dtype == dtype
    assert torch.equal(cache[positions, :half], cos[0, :, :half]) and torch.equal(cos[0, :, :half], cos[0, :, half:])
    assert torch.equal(cache[positions, half:], sin[0, :, :half]) and torch.equal(sin[0, :, :half], sin[0, :, half:])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rms_norm_matches_transformers(family, dtype):
    norm = FAMILIES[family][3](64, eps=1e-6).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x = (3 * torch.randn(7, 4, 64)).to(dtype)
    assert torch.equal(rms_norm(x, norm.weight, 1e-6), norm(x))
    mixed = FAMILIES[family][3](64, eps=1e-5)  # fp32 weight meeting low-precision activations: fp32 out
    assert torch.equal(rms_norm(x, mixed.weight, 1e-5), mixed(x))


def _hf_qk(attention, rotary, hidden, position_ids):
    """transformers' q/k path: projection, q_norm/k_norm over head_dim, apply_rotary_pos_emb; [B, H, S, D]."""
    shape = (*hidden.shape[:-1], -1, attention.head_dim)
    q = attention.q_norm(attention.q_proj(hidden).view(shape)).transpose(1, 2)
    k = attention.k_norm(attention.k_proj(hidden).view(shape)).transpose(1, 2)
    cos, sin = rotary(hidden, position_ids)
    apply_rotary_pos_emb = FAMILIES["qwen3_moe" if "Moe" in type(attention).__name__ else "qwen3"][4]
    return apply_rotary_pos_emb(q, k, cos, sin)


def _our_qk(attention, hidden, position_ids, cache, eps):
    """The same with the references; [B, S, H, D]."""
    shape = (*hidden.shape[:-1], -1, attention.head_dim)
    q = rms_norm(attention.q_proj(hidden).view(shape), attention.q_norm.weight, eps)
    k = rms_norm(attention.k_proj(hidden).view(shape), attention.k_norm.weight, eps)
    return apply_rotary_emb(position_ids, q, k, cache)


def _modules(family, rope, head_dim, heads_q, heads_kv, dtype):
    config = _config(family, head_dim, rope, heads_q=heads_q, heads_kv=heads_kv, dtype=dtype)
    _, attention_cls, rotary_cls, _, _ = FAMILIES[family]
    attention = attention_cls(config, layer_idx=0)
    for parameter in attention.parameters():  # seeded random weights, norms included
        torch.nn.init.normal_(parameter, std=0.2 if parameter.dim() > 1 else 1.0)
    return config, attention.to(dtype).eval(), rotary_cls(config)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rope", ["default", "yarn_qwen3_235b"])
@pytest.mark.parametrize("head_dim, heads_q, heads_kv", [(64, 4, 4), (128, 8, 2), (64, 8, 1)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_qk_norm_and_rope_match_transformers(family, head_dim, heads_q, heads_kv, rope, dtype):
    config, attention, rotary = _modules(family, rope, head_dim, heads_q, heads_kv, dtype)
    hidden = torch.randn(2, 7, config.hidden_size).to(dtype)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [40000, 40001, 40002, 40003, 131000, 131001, 131002]])
    q_hf, k_hf = _hf_qk(attention, rotary, hidden, position_ids)
    q_hf, k_hf = q_hf.transpose(1, 2), k_hf.transpose(1, 2)

    # A cache in the model dtype reproduces transformers' arithmetic exactly.
    cache = _long_cache(head_dim, rope, dtype)
    q, k = _our_qk(attention, hidden, position_ids, cache, config.rms_norm_eps)
    assert q.dtype == k.dtype == dtype
    assert torch.equal(q, q_hf) and torch.equal(k, k_hf)

    # The default fp32 cache rotates in fp32 (one rounding): within the dtype's tolerance of transformers.
    cache32 = _long_cache(head_dim, rope)
    q32, k32 = _our_qk(attention, hidden, position_ids, cache32, config.rms_norm_eps)
    assert_close(q32, q_hf)
    assert_close(k32, k_hf)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rope", ["default", "yarn_qwen3_235b"])
def test_rotation_is_complex_multiplication(rope, is_neox, dtype):
    """Pair (a, b) turned by angle t, scaled by m, is (a + ib) m e^{it}; neox pairs (i, i + D/2), else (2i, 2i + 1)."""
    head_dim, num_tokens = 64, 97
    cache = _long_cache(head_dim, rope)
    positions = torch.randint(0, 131072, (num_tokens,))
    query = torch.randn(num_tokens, 8, head_dim).to(dtype)
    key = torch.randn(num_tokens, 1, head_dim).to(dtype)
    q_rot, k_rot = apply_rotary_emb(positions, query, key, cache, is_neox=is_neox)

    cos, sin = cache[positions].chunk(2, dim=-1)
    phase = torch.complex(cos, sin)[:, None, :]  # [T, 1, D/2]
    for x, rotated in ((query, q_rot), (key, k_rot)):
        x = x.float()
        if is_neox:
            z = torch.complex(x[..., : head_dim // 2], x[..., head_dim // 2 :]) * phase
            expected = torch.cat((z.real, z.imag), dim=-1)
        else:
            z = torch.view_as_complex(x.reshape(*x.shape[:-1], head_dim // 2, 2).contiguous()) * phase
            expected = torch.view_as_real(z).flatten(-2)
        assert rotated.dtype == dtype and rotated.shape == x.shape
        assert_close(rotated, expected)


def test_key_may_be_none_and_inputs_are_not_modified():
    cache = compute_cos_sin_cache(64, 16)
    query = torch.randn(5, 2, 64)
    before = query.clone()
    q_rot, k_rot = apply_rotary_emb(torch.arange(5) + 3, query, None, cache)
    assert k_rot is None and torch.equal(query, before) and not torch.equal(q_rot, query)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rope", ["default", "yarn_qwen3_235b"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_layer_matches_transformers(family, rope, dtype):
    """A whole Qwen3 attention layer (sdpa, causal prefill at an offset) from the references."""
    head_dim, heads_q, heads_kv = 64, 8, 2
    config, attention, rotary = _modules(family, rope, head_dim, heads_q, heads_kv, torch.float32)
    hidden = torch.randn(2, 13, config.hidden_size)
    position_ids = torch.arange(13)[None].repeat(2, 1) + torch.tensor([[0], [70000]])

    def hf(attention, hidden):
        out, _ = attention(hidden, rotary(hidden, position_ids), attention_mask=None)
        return out

    def ours(attention, hidden):
        cache = _long_cache(head_dim, rope, hidden.dtype)
        q, k = _our_qk(attention, hidden, position_ids, cache, config.rms_norm_eps)
        v = attention.v_proj(hidden).view(*hidden.shape[:-1], heads_kv, head_dim)
        out = flash_attn_func(q, k, v, softmax_scale=attention.scaling, causal=True)
        return attention.o_proj(out.flatten(-2))

    low = FAMILIES[family][1](config, layer_idx=0).to(dtype).eval()
    low.load_state_dict(attention.state_dict())
    out = ours(low, hidden.to(dtype))
    if dtype == torch.float32:
        assert_close(out, hf(attention, hidden))
    else:
        assert_within_budget(out, hf(attention, hidden), hf(low, hidden.to(dtype)))


# --- kernels: every backend on every sample (strided views included), opcheck and compile are tests/test_ops.py -----

QK_ORDER = ("query", "key", "value", "q_norm_weight", "k_norm_weight", "eps", "positions", "cos_sin_cache",
            "key_cache", "value_cache", "slot_mapping", "is_neox")  # fmt: skip


def _qk_args(device="cpu", dtype=torch.float32, fused=False):
    """9 tokens (every third from the second is padding), D = 64, 4 query / 2 KV heads, 4 pages of 5 slots."""
    return qk_norm_rope_and_cache_args(9, 64, 4, 2, 5, fused, True, "fp32")(Inputs(torch.device(device), dtype))


@pytest.mark.parametrize("backend,device", backend_params("qk_norm_rope_and_cache"))
def test_qk_norm_rope_and_cache_writes_the_keys_it_returns(backend, device):
    """The key cache holds exactly the returned keys at the kept slots and nothing else changes (padding tokens write
    nowhere); the value cache holds the values."""
    args = _qk_args(device, torch.float16, fused=True)
    own_keys, own_values = args["key_cache"].clone(), args["value_cache"].clone()
    with qwen_fast.use_backend(backend):
        _, k_out = qwen_fast.qk_norm_rope_and_cache(**args)
    reference_reshape_and_cache(k_out, args["value"], own_keys, own_values, args["slot_mapping"])
    assert torch.equal(args["key_cache"], own_keys) and torch.equal(args["value_cache"], own_values)


# --- bad input: named, value-bearing errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda i: {"query": i["query"].numpy()}, TypeError, "query must be a torch.Tensor, got ndarray"),
        (lambda i: {"query": i["query"][0]}, ValueError, r"query must have 3 dimensions, got shape \(4, 64\)"),
        (
            lambda i: {"query": i["query"].int()},
            TypeError,
            "query must be float32 or float16 or bfloat16, got torch.int32",
        ),
        (lambda i: {"key": i["key"].half()}, TypeError, "key must be float32, got torch.float16"),
        (lambda i: {"key": i["key"][:, :, :32]}, ValueError, r"key must be \[..., H, D\] .* got \(9, 2, 32\)"),
        (lambda i: {"value": i["value"][:, :1]}, ValueError, r"value must be \[T, Hkv, D\] = key's shape \(9, 2, 64\)"),
        (lambda i: {"q_norm_weight": i["q_norm_weight"][:32]}, ValueError, r"q_norm_weight must be \[D\] = \(64,\)"),
        (lambda i: {"k_norm_weight": i["k_norm_weight"].half()}, TypeError, "k_norm_weight must be float32, got"),
        (lambda i: {"eps": -1.0}, ValueError, "eps must be >= 0, got -1.0"),
        (lambda i: {"eps": "1e-6"}, TypeError, "eps must be a float, got str '1e-6'"),
        (lambda i: {"eps": float("nan")}, ValueError, "eps must be >= 0, got nan"),
        (lambda i: {"positions": i["positions"].int()}, TypeError, "positions must be int64, got torch.int32"),
        (lambda i: {"positions": i["positions"][:3]}, ValueError, r"positions must be \[T\] or \[B, S\] .* \(9,\)"),
        (
            lambda i: {"positions": i["positions"] + 1},
            ValueError,
            r"positions holds values in \[\d+, 131072\], outside cos_sin_cache's \[0, 131072\)",
        ),
        (lambda i: {"positions": i["positions"] - 2**20}, ValueError, "positions holds values in"),
        (lambda i: {"cos_sin_cache": i["cos_sin_cache"][:, :32]}, ValueError, "cos_sin_cache must be contiguous"),
        (lambda i: {"cos_sin_cache": i["cos_sin_cache"].double()}, TypeError, "cos_sin_cache must be float32"),
        (
            lambda i: {"query": i["query"][..., :63]},
            ValueError,
            r"query.s head_dim must be even \(pairs are rotated\), got 63",
        ),
        (
            lambda i: {"key_cache": i["key_cache"][..., :32]},
            ValueError,
            r"key_cache \[num_blocks, block_size, Hkv, D\] = \(4, 5, 2, 32\) does not match key",
        ),
        (lambda i: {"value_cache": i["value_cache"][:2]}, ValueError, "value_cache must have key_cache's shape"),
        (lambda i: {"slot_mapping": i["slot_mapping"].int()}, TypeError, "slot_mapping must be int64, got torch.int32"),
        (lambda i: {"slot_mapping": i["slot_mapping"][:3]}, ValueError, r"slot_mapping must be \[T\] = \(9,\)"),
        (
            lambda i: {"slot_mapping": i["slot_mapping"] + 40},
            ValueError,
            r"slot_mapping holds values in \[\d+, \d+\], outside the caches' 20 slots",
        ),
        (
            lambda i: {"query": i["query"].transpose(1, 2).contiguous().transpose(1, 2)},
            ValueError,
            "query must be contiguous in its last dimension",
        ),
        (lambda i: {"key": i["key"].to("meta")}, ValueError, "key must be on cpu like the other inputs, got meta"),
        (lambda i: {"is_neox": 1}, TypeError, "is_neox must be a bool, got int 1"),
    ],
)
def test_qk_norm_rope_and_cache_bad_input(change, error, message):
    inputs = _qk_args()
    with pytest.raises(error, match=message):
        qwen_fast.qk_norm_rope_and_cache(**(inputs | change(inputs)))


@pytest.mark.parametrize(
    "args,error,message",
    [
        (
            {"query": torch.randn(2, 4, 3, 4, 64)},
            ValueError,
            r"query must be \[\*P, H \* head_size\] or \[\*P, H, head_size\] with P = positions' shape \(9,\) "
            r"and head_size = 64, got shape \(2, 4, 3, 4, 64\)",
        ),
        ({"head_size": 48}, ValueError, r"query must be .* head_size = 48, got shape \(9, 4, 64\)"),
        ({"query": torch.randn(9, 4 * 64 + 8)}, ValueError, r"got shape \(9, 264\)"),
        ({"head_size": 64.0}, TypeError, "head_size must be an int, got float 64.0"),
        ({"key": torch.randn(8, 2, 64)}, ValueError, r"key must be \[\*P, H \* head_size\].*got shape \(8, 2, 64\)"),
        ({"key": torch.randn(9, 2, 64).bfloat16()}, TypeError, "key must be float32, got torch.bfloat16"),
        ({"positions": torch.arange(8).view(2, 2, 2)}, ValueError, r"positions must be \[T\] or \[B, S\]"),
        ({"positions": torch.arange(9).int()}, TypeError, "positions must be int64, got torch.int32"),
        ({"cos_sin_cache": torch.randn(64, 4096).t()}, ValueError, "cos_sin_cache must be contiguous"),
        ({"cos_sin_cache": torch.randn(16, 80)}, ValueError, "must have rot_dim <= head_size=64, got 80"),
        ({"rope_dim_offset": 8}, ValueError, r"rope_dim_offset must be in \[0, 0\], got 8"),
        ({"inverse": 1}, TypeError, "inverse must be a bool, got int 1"),
        ({"is_neox": None}, TypeError, "is_neox must be a bool, got NoneType None"),
    ],
)
def test_rotary_embedding_bad_input(args, error, message):
    inputs = {"positions": torch.arange(9), "query": torch.randn(9, 4, 64), "key": torch.randn(9, 2, 64)}
    inputs |= {"head_size": 64, "cos_sin_cache": compute_cos_sin_cache(64, 4096), "is_neox": True}
    with pytest.raises(error, match=message):
        qwen_fast.rotary_embedding(**(inputs | args))


@pytest.mark.parametrize("backend, device", backend_params("rotary_embedding"))
def test_rotary_embedding_is_vllms_in_place_op(backend, device):
    """vLLM's rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset, inverse):
    query and key are rotated in place, flat [T, H * D] or [T, H, D]; only dims [offset, offset + rot_dim) of each
    head turn; inverse undoes the rotation."""
    positions, cache = torch.tensor([0, 5, 900], device=device), compute_cos_sin_cache(32, 1024).to(device)
    query, key = torch.randn(3, 4 * 64, device=device), torch.randn(3, 2, 64, device=device)
    q0, k0 = query.clone(), key.clone()
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        assert qwen_fast.rotary_embedding(positions, query, key, 64, cache, False, rope_dim_offset=16) is None
        rotated_q, rotated_k = query.clone(), key.clone()
        qwen_fast.rotary_embedding(positions, query, key, 64, cache, False, rope_dim_offset=16, inverse=True)
    assert [ran for _, ran in calls] == [backend, backend]
    q_rot, k_rot = apply_rotary_emb(positions, q0.view(3, 4, 64)[..., 16:48], k0[..., 16:48], cache, is_neox=False)
    assert_close(rotated_q.view(3, 4, 64)[..., 16:48], q_rot)
    assert_close(rotated_k[..., 16:48], k_rot)
    assert torch.equal(rotated_q.view(3, 4, 64)[..., :16], q0.view(3, 4, 64)[..., :16])
    assert torch.equal(rotated_k[..., 48:], k0[..., 48:])
    assert_close(query, q0)
    assert_close(key, k0)


def test_native_rope_ops_check_ranges():
    """Direct torch.ops calls skip the Python checks: the C++ ones raise instead of reading out of bounds."""
    inputs = _qk_args()
    args = dict(inputs, positions=inputs["positions"] + 1)
    rotary = [args[name] for name in ("positions", "query", "key", "cos_sin_cache", "is_neox")]
    with pytest.raises(RuntimeError, match=r"positions\[8\] = 131072 is outside the cos_sin_cache's \[0, 131072\)"):
        torch.ops.qwen_fast.rotary_embedding(*rotary)
    args = dict(inputs, slot_mapping=inputs["slot_mapping"] + 100)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[0\] = \d+ is past the caches' 20 slots"):
        torch.ops.qwen_fast.qk_norm_rope_and_cache(*(args[name] for name in QK_ORDER))
    args = dict(inputs, q_norm_weight=inputs["query"])
    with pytest.raises(RuntimeError, match="the norm weights must be contiguous"):
        torch.ops.qwen_fast.qk_norm_rope_and_cache(*(args[name] for name in QK_ORDER))
