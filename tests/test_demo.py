"""`qwen-fast demo`: unpatched vs patched generation on the embedded small Qwen3-MoE and on local checkpoints, and the
up-front checks that stop it, with a clear message, before anything is generated."""

import re

import pytest
from tiny_models import tiny_model

from qwen_fast.cli import main
from qwen_fast.cli.demo import reading
from qwen_fast.ops import reread_environment

SMALL = ("--batch", "2", "--prompt-len", "5", "--new-tokens", "4", "--block-size", "4", "--rounds", "2")


def _demo(capsys, *argv: str) -> str:
    assert main(["demo", *argv]) == 0
    return capsys.readouterr().out


def _refused(capsys, match: str, *argv: str) -> None:
    """The demo stops with `match` before it loads or generates anything."""
    with pytest.raises(SystemExit, match=match):
        main(["demo", *argv])
    assert "generated tokens" not in capsys.readouterr().out


def test_embedded_model(capsys):
    out = _demo(capsys, "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--backend", "cpu", "--rounds", "2")
    assert "embedded small Qwen3-MoE (qwen3_moe_small.json, random weights): 4 layers" in out
    assert re.search(r"float32 on cpu, \d+ threads", out)
    assert "patched: 4 x Qwen3MoeSparseMoeBlock -> qwen_fast.nn.SparseMoeBlock" in out
    assert "transformers (experts grouped_mm, attention sdpa, DynamicCache)" in out
    for op in ("fused_topk", "fused_experts", "qk_norm_rope_and_cache", "flash_attn_with_kvcache"):
        assert re.search(rf"{op} +cpu +x \d+", out), f"{op} did not run on cpu:\n{out}"
    assert "generated tokens: 8/8 identical (2/2 sequences identical)" in out
    difference = float(re.search(r"against the unpatched run, first 4 steps: (\S+)", out).group(1))
    assert difference < 1e-4
    rates = r"median [\d.]+ \(range [\d.]+-[\d.]+\)"
    assert re.search(rf"over 2 alternating rounds, \d+ threads: transformers {rates}, qwen_fast {rates}", out)
    assert re.search(r"reading: .*[\d.]+x", out)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpret)])
def test_local_checkpoint(tmp_path, capsys, backend):
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    out = _demo(capsys, "--model", str(tmp_path), "--batch", "3", "--prompt-len", "5", "--new-tokens", "6",
                "--block-size", "4", "--rounds", "1", "--backend", backend)  # fmt: skip
    assert "Qwen3MoeForCausalLM): 2 layers, hidden 32, 8 experts top-2" in out
    assert re.search(rf"fused_experts +{backend} +x \d+", out)
    assert "generated tokens: 18/18 identical" in out


@pytest.mark.parametrize("experts", ["fp8", "int8"])
def test_quantized_experts(tmp_path, capsys, experts):
    """--experts: qwen_fast's side runs 8-bit experts, transformers' side the same weights dequantized (fp32 here):
    the same tokens and logits within the fp32 tolerance."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    out = _demo(capsys, "--model", str(tmp_path), "--experts", experts, "--backend", "cpu", *SMALL)
    assert re.search(rf"with {experts} experts \(.*MiB of weights and scales against [\d.]+ MiB in float32", out)
    assert re.search(r"fused_experts +cpu +x \d+", out)
    assert "generated tokens: 8/8 identical" in out
    assert float(re.search(r"against the unpatched run, first 4 steps: (\S+)", out).group(1)) < 1e-4


def test_dense_model_is_not_labelled_with_experts(tmp_path, capsys):
    tiny_model("qwen3").save_pretrained(tmp_path)
    out = _demo(capsys, "--model", str(tmp_path), "--backend", "cpu", *SMALL)
    assert "transformers (attention sdpa, DynamicCache)" in out and "experts" not in out.split("[patched]")[0]


def test_mla_model_runs_with_a_dynamic_cache_and_says_so(tmp_path, capsys):
    tiny_model("deepseek_v3").save_pretrained(tmp_path)
    out = _demo(capsys, "--model", str(tmp_path), "--backend", "cpu", *SMALL)
    assert "with transformers' DynamicCache: multi-head latent attention (K head dim 16, V head dim 8)" in out
    assert "PagedKVCache" not in out and re.search(r"fused_experts +cpu +x \d+", out)
    assert "generated tokens: 8/8 identical" in out


def test_bf16_explains_why_tokens_may_differ(capsys):
    out = _demo(capsys, "--batch", "1", "--prompt-len", "4", "--new-tokens", "2", "--rounds", "1", "--dtype",
                "bfloat16", "--backend", "cpu")  # fmt: skip
    assert "(bfloat16; largest |logit|" in out and "near ties" in out and "against the unpatched bfloat16 run" in out


def test_reading_of_the_rounds():
    assert reading([10, 11, 12], [30, 31, 29]).startswith("qwen_fast is 2.73x transformers' speed (faster")
    assert "no clear difference" in reading([10, 20, 30], [15, 25, 12])
    assert "slower" in reading([30, 31, 32], [10, 11, 12])


def test_bad_arguments(tmp_path, capsys):
    _refused(capsys, "--new-tokens must be >= 1, got 0", "--new-tokens", "0")
    _refused(capsys, "--rounds must be >= 1, got 0", "--rounds", "0")
    _refused(capsys, "is not a directory", "--model", str(tmp_path / "missing"))
    _refused(capsys, "is not a transformers checkpoint: it has no config.json", "--model", str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    _refused(capsys, "transformers cannot load it as a causal LM", "--model", str(tmp_path))
    tiny_model("qwen3").save_pretrained(tmp_path / "qwen3")
    _refused(
        capsys, "--prompt needs a checkpoint with a tokenizer", "--model", str(tmp_path / "qwen3"), "--prompt", "x"
    )


def test_backend_and_model_problems_are_found_before_generating(tmp_path, capsys, monkeypatch):
    _refused(capsys, "--backend cuda needs", "--backend", "cuda")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    _refused(capsys, "found nothing to patch in LlamaForCausalLM", "--model", str(tmp_path), *SMALL)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reread_environment()
    try:
        message = r"--backend triton cannot run these ops on cpu torch.bfloat16 here:\n  fused_experts: Triton's "
        message += r"interpreter .* cannot run fused_experts on torch.bfloat16"
        _refused(capsys, message, "--backend", "triton", "--dtype", "bfloat16")
    finally:
        monkeypatch.undo()
        reread_environment()
