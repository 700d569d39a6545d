"""`qwen-fast demo`: unpatched vs patched generation on the embedded small Qwen3-MoE and on a local checkpoint."""

import re

import pytest
from tiny_models import tiny_model

from qwen_fast.cli import main


def _demo(capsys, *argv: str) -> str:
    assert main(["demo", *argv]) == 0
    return capsys.readouterr().out


def test_embedded_model(capsys):
    out = _demo(capsys, "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--backend", "cpu")
    assert "embedded small Qwen3-MoE (qwen3_moe_small.json, random weights): 4 layers" in out
    assert "patched: 4 x Qwen3MoeSparseMoeBlock -> qwen_fast.nn.SparseMoeBlock" in out
    for op in ("fused_topk", "fused_experts", "qk_norm_rope_and_cache", "flash_attn_with_kvcache"):
        assert re.search(rf"{op} +cpu +x \d+", out), f"{op} did not run on cpu:\n{out}"
    assert "generated tokens: 8/8 identical (2/2 sequences identical)" in out
    difference = float(re.search(r"max \|logit difference\|, first 4 steps: (\S+)", out).group(1))
    assert difference < 1e-4
    assert re.search(r"throughput: transformers [\d.]+ tokens/s, qwen_fast [\d.]+ tokens/s", out)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpret)])
def test_local_checkpoint(tmp_path, capsys, backend):
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    out = _demo(capsys, "--model", str(tmp_path), "--batch", "3", "--prompt-len", "5", "--new-tokens", "6",
                "--block-size", "4", "--backend", backend)  # fmt: skip
    assert "Qwen3MoeForCausalLM): 2 layers, hidden 32, 8 experts top-2" in out
    assert re.search(rf"fused_experts +{backend} +x \d+", out)
    assert "generated tokens: 18/18 identical" in out


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--new-tokens must be >= 1, got 0"):
        main(["demo", "--new-tokens", "0"])
    tiny_model("qwen3").save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="--prompt needs a checkpoint with a tokenizer"):
        main(["demo", "--model", str(tmp_path), "--prompt", "hello"])
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["demo", "--model", str(tmp_path / "missing")])
