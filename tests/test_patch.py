"""qwen_fast.patch on tiny random models of every supported family (tests/tiny_models.py): patched logits match the
unpatched model, greedy generation gives the same tokens with DynamicCache and PagedKVCache, output_router_logits
still works, and undo() restores bit-identical outputs."""

import logging

import pytest
import torch
from numerics import assert_close, assert_within_budget
from tiny_models import FAMILIES, MOE_FAMILIES, tiny_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import qwen_fast
from qwen_fast.integrations.patch import FAMILIES as PATCH_FAMILIES

BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.interpret)]
ROUTE = {f.model_type: f.route for f in PATCH_FAMILIES}  # "module", "interface" or "" (attention not served)
SERVED = {family for family, route in ROUTE.items() if route}
LM_HEAD = "1 x Linear (lm_head) -> qwen_fast.nn.Linear"  # every patched model's LM head (qwen_fast.nn.Linear)
PAGED = [family for family in FAMILIES if family != "deepseek_v3"]  # MLA caches one latent head: see test below


def _prompt(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(2, 97, (batch, seq), generator=torch.Generator().manual_seed(1))


def _logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


def _expected_ops(family: str) -> set[str]:
    ops = {"fused_experts"} if family in MOE_FAMILIES else set()
    return ops | ({"flash_attn_func"} if family in SERVED else set())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_logits_match(family, backend):
    model = tiny_model(family)
    ids = _prompt()
    expected = _logits(model, ids)
    qwen_fast.patch(model)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        actual = _logits(model, ids)
    assert_close(actual, expected)
    ran = {op for op, used in calls if used == backend}
    assert _expected_ops(family) <= ran, f"expected {_expected_ops(family)} on {backend}, got {sorted(set(calls))}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", ["dynamic", "paged"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_identical(family, cache, backend):
    if cache == "paged" and family not in PAGED:
        pytest.skip("DeepSeek-V3's latent attention caches one shared head: see test_paged_cache_refuses_mla")
    model = tiny_model(family)
    ids = _prompt()
    expected = model.generate(ids, max_new_tokens=32, do_sample=False)
    qwen_fast.patch(model)
    past = DynamicCache(config=model.config) if cache == "dynamic" else qwen_fast.PagedKVCache.for_model(
        model, max_batch=2, block_size=5)  # fmt: skip
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        actual = model.generate(ids, cache=past, max_new_tokens=32, do_sample=False)
    assert torch.equal(actual, expected)
    ran = {op for op, used in calls if used == backend}
    expected_ops = _expected_ops(family)
    if cache == "paged" and ROUTE[family] == "module":  # GQAAttention attends over the pages in place
        write = "qk_norm_rope_and_cache" if family.startswith("qwen3") else "reshape_and_cache"  # Qwen2: no q/k norm
        expected_ops = expected_ops - {"flash_attn_func"} | {write, "flash_attn_with_kvcache"}
    assert expected_ops <= ran, f"expected {expected_ops} on {backend}, got {sorted(set(calls))}"


def test_paged_cache_refuses_mla():
    model = tiny_model("deepseek_v3")
    qwen_fast.patch(model, attention=False)
    cache = qwen_fast.PagedKVCache.for_model(model, max_batch=2, block_size=4)
    with pytest.raises(ValueError, match="key_states must be"):
        model.generate(_prompt(), cache=cache, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_output_router_logits(family):
    model = tiny_model(family, output_router_logits=True, router_aux_loss_coef=0.01)
    ids = _prompt()
    with torch.no_grad():
        expected = model(ids, labels=ids)
    handle = qwen_fast.patch(model)
    with torch.no_grad():
        actual = model(ids, labels=ids)
    assert len(actual.router_logits) == len(expected.router_logits) > 0
    for ours, theirs in zip(actual.router_logits, expected.router_logits, strict=True):
        assert_close(ours, theirs)
    if expected.aux_loss is None:  # DeepSeek-V3 computes no load-balancing loss
        assert actual.aux_loss is None
    else:
        assert_close(actual.aux_loss, expected.aux_loss)
    handle.undo()  # the recorder hooks installed while patched stay on the original routers
    with torch.no_grad():
        assert len(model(ids).router_logits) == len(expected.router_logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_undo_restores_bit_identical(family):
    model = tiny_model(family)
    ids = _prompt()
    expected = _logits(model, ids)
    modules_before = dict(model.named_modules())
    implementation = model.config._attn_implementation
    with qwen_fast.patch(model) as handle:
        assert handle.patched and handle.active
        assert dict(model.named_modules()) != modules_before
    assert not handle.active
    assert dict(model.named_modules()) == modules_before  # the same module objects, in the same places
    assert model.config._attn_implementation == implementation
    assert torch.equal(_logits(model, ids), expected)
    handle.undo()  # a second undo does nothing
    assert "undone" in handle.summary()
    qwen_fast.patch(model).undo()  # and the model can be patched again


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_within_budget(family):
    ids = _prompt()
    ref_fp32 = _logits(tiny_model(family), ids)
    model = tiny_model(family, dtype=torch.bfloat16)
    ref_bf16 = _logits(model, ids)
    qwen_fast.patch(model)
    with qwen_fast.use_backend("cpu"), qwen_fast.record_backends() as calls:
        actual = _logits(model, ids)
    assert ("fused_experts", "cpu") in calls or family not in MOE_FAMILIES
    assert_within_budget(actual, ref_fp32, ref_bf16)


def test_partial_patch_lists_what_was_not_patched(caplog):
    model = tiny_model("deepseek_v3")
    with caplog.at_level(logging.WARNING, logger="qwen_fast"):
        handle = qwen_fast.patch(model)
    assert handle.patched == ["1 x DeepseekV3MoE -> qwen_fast.nn.SparseMoeBlock", LM_HEAD]
    assert handle.not_patched == [
        "2 x DeepseekV3Attention: multi-head latent attention (q/k and v head dims differ) is not implemented"
    ]
    assert "not patched: 2 x DeepseekV3Attention" in caplog.text


def test_moe_only_and_attention_only():
    model = tiny_model("qwen3_moe")
    with qwen_fast.patch(model, attention=False) as handle:
        assert handle.patched == ["2 x Qwen3MoeSparseMoeBlock -> qwen_fast.nn.SparseMoeBlock", LM_HEAD]
    with qwen_fast.patch(model, moe=False) as handle:
        assert handle.patched == ["2 x Qwen3MoeAttention -> qwen_fast.nn.GQAAttention", LM_HEAD]


def test_unsupported_model_is_a_clear_error():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match=r"nothing to patch in LlamaForCausalLM \(2 x LlamaAttention: not a class"):
        qwen_fast.patch(model)
    assert not hasattr(model, "_qwen_fast_patch")


def test_bad_arguments():
    model = tiny_model("qwen3")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        qwen_fast.patch("Qwen/Qwen3-30B-A3B")
    with pytest.raises(ValueError, match="leave nothing to patch"):
        qwen_fast.patch(model, moe=False, attention=False)
    with pytest.raises(ValueError, match="found nothing to patch in Qwen3ForCausalLM"):
        qwen_fast.patch(model, attention=False)  # a dense model has no MoE block
    handle = qwen_fast.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        qwen_fast.patch(model)
    model.model.layers[0].self_attn = torch.nn.Identity()
    with pytest.raises(RuntimeError, match="was replaced after patching"):
        handle.undo()


def test_matches_transformers_classes_only_and_swaps_all_or_nothing(monkeypatch):
    """A class that borrows a supported name (remote code) is not taken for transformers' own; a module that fails to
    convert leaves the whole model as it was."""
    model = tiny_model("qwen3_moe")
    model.model.layers[1].mlp = type("Qwen3MoeSparseMoeBlock", (torch.nn.Identity,), {})()
    handle = qwen_fast.patch(model)
    assert "1 x Qwen3MoeSparseMoeBlock -> qwen_fast.nn.SparseMoeBlock" in handle.patched
    assert handle.not_patched == [f"1 x Qwen3MoeSparseMoeBlock from {__name__}: not transformers' class of that name"]
    handle.undo()

    model = tiny_model("qwen3_moe")
    before = [type(module) for module in model.modules()]
    convert, seen = qwen_fast.nn.SparseMoeBlock.from_hf, []

    def fails_second(block, hf_parity=False):
        seen.append(block)
        if len(seen) == 2:
            raise TypeError("cannot convert this block")
        return convert(block, hf_parity)

    monkeypatch.setattr(qwen_fast.nn.SparseMoeBlock, "from_hf", fails_second)
    with pytest.raises(TypeError, match="cannot convert this block"):
        qwen_fast.patch(model)
    assert [type(module) for module in model.modules()] == before
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_qwen_fast_patch")
