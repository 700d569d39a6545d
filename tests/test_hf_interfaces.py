"""qwen_fast registered with transformers (qwen_fast.register_transformers): tiny random Qwen3-MoE, Mixtral (with a
sliding window) and OLMoE checkpoints loaded with experts_implementation="qwen_fast", attn_implementation="qwen_fast"
against the same checkpoints loaded with transformers' defaults (sdpa attention, grouped_mm experts). Logits must agree
within the fp32 tolerance and greedy generation must give the same tokens; record_backends proves which of
qwen_fast's ops ran, and on which backend."""

import subprocess
import sys

import pytest
import torch
from numerics import assert_close
from tiny_models import tiny_model
from transformers import AttentionInterface, AutoModelForCausalLM

import qwen_fast
from qwen_fast.integrations import interfaces

NAME = qwen_fast.register_transformers()
# family -> config overrides of tests/tiny_models.py (Mixtral with a sliding window of 5 keys)
FAMILIES = {"qwen3_moe": {}, "mixtral": {"sliding_window": 5}, "olmoe": {"norm_topk_prob": True}}
FAST = {"experts_implementation": NAME, "attn_implementation": NAME}
# Two prompts of 9 tokens, the second left-padded to 6 real ones.
PROMPTS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 23, 71], [0, 0, 0, 12, 7, 95, 33, 4, 50]])
MASK = (torch.arange(9) >= torch.tensor([[0], [3]])).long()


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """A tiny random checkpoint of each family (fp32), saved once per module."""
    path = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param, **FAMILIES[request.param]).save_pretrained(path)
    return path


def _load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _ops(calls) -> dict[str, set[str]]:
    """op -> the backends it ran on."""
    ran: dict[str, set[str]] = {}
    for op, backend in calls:
        ran.setdefault(op, set()).add(backend)
    return ran


def _greedy(model, prompts, mask=None):
    return model.generate(prompts, attention_mask=mask, max_new_tokens=16, do_sample=False)


def test_loaded_with_qwen_fast_matches_default(checkpoint):
    default, fast = _load(checkpoint), _load(checkpoint, **FAST)
    assert (fast.config._experts_implementation, fast.config._attn_implementation) == (NAME, NAME)
    with torch.no_grad(), qwen_fast.record_backends() as calls:
        logits = fast(PROMPTS).logits
        padded = fast(PROMPTS, attention_mask=MASK).logits
    assert _ops(calls) == {"fused_experts": {"cpu"}, "flash_attn_func": {"cpu"}, "flash_attn_varlen_func": {"cpu"}}
    with torch.no_grad():
        assert_close(logits, default(PROMPTS).logits)
        # Padding positions differ by design (qwen_fast outputs 0 there): compare the real tokens.
        assert_close(padded[MASK.bool()], default(PROMPTS, attention_mask=MASK).logits[MASK.bool()])


def test_greedy_generation_matches_default(checkpoint):
    default, fast = _load(checkpoint), _load(checkpoint, **FAST)
    with qwen_fast.record_backends() as calls:
        single, batch = _greedy(fast, PROMPTS[:1]), _greedy(fast, PROMPTS, MASK)
    # prefill: flash_attn_func (or varlen with padding); decode: flash_attn_with_kvcache over the written keys
    assert set(_ops(calls)) == {"fused_experts", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"}
    assert torch.equal(single, _greedy(default, PROMPTS[:1]))
    assert torch.equal(batch, _greedy(default, PROMPTS, MASK))


@pytest.mark.interpret
def test_triton_backend_matches_default(checkpoint):
    default, fast = _load(checkpoint), _load(checkpoint, **FAST)
    with torch.no_grad(), qwen_fast.use_backend("triton"), qwen_fast.record_backends() as calls:
        padded = fast(PROMPTS, attention_mask=MASK).logits
        logits = fast(PROMPTS).logits
        batch = _greedy(fast, PROMPTS, MASK)
    ran = _ops(calls)  # (fused_experts' Triton path also records the moe_align_block_size it runs)
    assert {op: ran.get(op) for op in ("fused_experts", "flash_attn_func", "flash_attn_varlen_func")} == {
        "fused_experts": {"triton"}, "flash_attn_func": {"triton"}, "flash_attn_varlen_func": {"triton"}}  # fmt: skip
    with torch.no_grad():
        assert_close(logits, default(PROMPTS).logits)
        assert_close(padded[MASK.bool()], default(PROMPTS, attention_mask=MASK).logits[MASK.bool()])
    assert torch.equal(batch, _greedy(default, PROMPTS, MASK))


def test_set_implementation_switches_back_and_forth(checkpoint):
    model = _load(checkpoint)
    with torch.no_grad():
        expected = model(PROMPTS).logits
        for experts, attention, ran in [
            (NAME, "sdpa", {"fused_experts"}),
            (NAME, NAME, {"fused_experts", "flash_attn_func"}),
            ("grouped_mm", NAME, {"flash_attn_func"}),
            ("grouped_mm", "sdpa", set()),
        ]:
            model.set_experts_implementation(experts)
            model.set_attn_implementation(attention)
            with qwen_fast.record_backends() as calls:
                logits = model(PROMPTS).logits
            assert set(_ops(calls)) == ran, (experts, attention)
            assert_close(logits, expected)


def test_packed_sequences_match_default(checkpoint):
    """One row holding two sequences (positions restart, no cache): both attend within their own sequence only."""
    default, fast = _load(checkpoint), _load(checkpoint, **FAST)
    tokens, positions = PROMPTS.reshape(1, -1), torch.cat((torch.arange(7), torch.arange(11)))[None]
    with torch.no_grad(), qwen_fast.record_backends() as calls:
        logits = fast(tokens, position_ids=positions, use_cache=False).logits
        expected = default(tokens, position_ids=positions, use_cache=False).logits
    assert "flash_attn_varlen_func" in _ops(calls)
    assert_close(logits, expected)
    # The same sequences given as offsets (transformers' padding-free kwargs, as DataCollatorWithFlattening makes).
    offsets = torch.tensor([0, 7, 18], dtype=torch.int32)
    varlen = {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": 11, "max_length_k": 11}
    with torch.no_grad():
        assert_close(fast(tokens, position_ids=positions, use_cache=False, **varlen).logits, expected)
    # The second sequence alone gives the same logits: nothing leaked across the boundary.
    with torch.no_grad():
        assert_close(logits[:, 7:], fast(tokens[:, 7:], use_cache=False).logits)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_function_conventions(causal, window):
    """The attention function alone against SDPA with the explicit mask: transformers' [B, H, S, D] layout, GQA,
    the default scale D ** -0.5, module.is_causal, and the window of transformers' flash attention (keys less than
    `window` positions away; causal: on the left only)."""
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    module = torch.nn.Module()
    module.is_causal = causal
    distance = torch.arange(7)[:, None] - torch.arange(7)[None]  # query position - key position
    visible = distance >= 0 if causal else torch.ones(7, 7, dtype=torch.bool)
    if window is not None:
        visible &= distance.abs() < window
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    with qwen_fast.record_backends() as calls:
        out, weights = interfaces.attention_forward(module, q, k, v, None, sliding_window=window)
    assert weights is None and calls == [("flash_attn_func", "cpu")]
    assert_close(out, expected.transpose(1, 2))
    if not causal:
        with pytest.raises(ValueError, match="key padding for causal attention only"):
            interfaces.attention_forward(module, q, k, v, MASK[:, 2:].bool(), sliding_window=window)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("is_transposed", True), ("has_bias", True), ("is_concatenated", False), ("has_gate", False),
     ("act_fn", torch.nn.GELU())],
)  # fmt: skip
def test_unsupported_experts_layout_is_refused(flag, value):
    model = tiny_model("qwen3_moe")
    model.set_experts_implementation(NAME)
    setattr(model.model.layers[0].mlp.experts, flag, value)
    with pytest.raises(ValueError, match=rf"Qwen3MoeExperts has {flag}="), torch.no_grad():
        model(PROMPTS)


def test_attention_dropout_in_training_is_refused():
    model = tiny_model("qwen3_moe")
    model.model.layers[0].self_attn.attention_dropout = 0.1
    model.set_attn_implementation(NAME)
    with pytest.raises(ValueError, match=r"Qwen3MoeAttention asked for dropout=0.1"):
        model.train()(PROMPTS)


def test_register_is_idempotent_and_checks_the_name():
    assert qwen_fast.register_transformers() == NAME == qwen_fast.register_transformers()
    assert AttentionInterface()[NAME] is interfaces.attention_forward
    for bad in ("my_flash", "org/kernel", "", "sdpa"):
        with pytest.raises(ValueError, match="name"):
            qwen_fast.register_transformers(bad)


def test_importing_qwen_fast_does_not_import_transformers():
    code = "import sys, qwen_fast; assert 'transformers' not in sys.modules; qwen_fast.register_transformers"
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


@pytest.mark.parametrize("source", ["position_ids", "max_length", "dict", "none"])
def test_packed_sequences_pass_their_longest_length(monkeypatch, source):
    """The varlen kernel's grid comes from the longest sequence, not the token count: read off position_ids on
    the host, or transformers' max_length_q/k (continuous batching: a dict per layer type); the token count only
    when neither is known. The output matches SDPA per sequence."""
    seen = []
    varlen = interfaces.flash_attn_varlen_func
    monkeypatch.setattr(interfaces, "flash_attn_varlen_func", lambda *a, **kw: seen.append(a[5:7]) or varlen(*a, **kw))
    q, k, v = torch.randn(1, 4, 18, 16), torch.randn(1, 2, 18, 16), torch.randn(1, 2, 18, 16)
    module = torch.nn.Module()
    module.is_causal = True
    offsets = torch.tensor([0, 7, 18], dtype=torch.int32)
    kwargs = {
        "position_ids": {"position_ids": torch.cat((torch.arange(7), torch.arange(11)))[None]},
        "max_length": {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": 11, "max_length_k": 11},
        "dict": {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": 11,
                 "max_length_k": {"full_attention": 11, "sliding_attention": 5}},
        "none": {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets},
    }[source]  # fmt: skip
    out, _ = interfaces.attention_forward(module, q, k, v, None, **kwargs)
    assert seen == [(18, 18) if source == "none" else (11, 11)]
    for start, end in ((0, 7), (7, 18)):
        part = (t[:, :, start:end] for t in (q, k, v))
        expected = torch.nn.functional.scaled_dot_product_attention(*part, is_causal=True, enable_gqa=True)
        assert_close(out[:, start:end], expected.transpose(1, 2))
