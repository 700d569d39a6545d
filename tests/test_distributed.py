"""qwen_fast in transformers' tensor and expert parallelism, in real processes: torchrun starts 2 ranks (gloo, CPU)
running tests/distributed_worker.py over a tiny Qwen3-MoE checkpoint, once for every setup. Each setup's logits must
match one process without qwen_fast within the fp32 tolerance, and greedy tokens (generate, and continuous batching
where run) must be identical; the record of backends proves that qwen_fast's kernels ran."""

import json
import subprocess
import sys

import pytest
import torch
from numerics import assert_close
from tiny_models import tiny_model

pytest.importorskip("accelerate", reason="transformers' tensor parallelism needs accelerate (the test extra)")
import distributed_worker  # noqa: E402  (after the skip: it imports transformers.distributed)

ATTENTION = {"registered": "flash_attn_func", "patch": "qk_norm_rope_and_cache"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    path = tmp_path_factory.mktemp("distributed")
    tiny_model("qwen3_moe").save_pretrained(path / "checkpoint")
    out = path / "results.jsonl"
    command = [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc_per_node", "2",
               distributed_worker.__file__, str(path / "checkpoint"), str(out)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    found = {line["setup"]: line for line in map(json.loads, out.read_text().splitlines())}
    for setup, result in found.items():
        if "error" not in result:
            result.update(torch.load(f"{out}.{setup}.pt"))
    return found


@pytest.mark.parametrize("setup", list(distributed_worker.SETUPS))
def test_setup_matches_one_process(results, setup):
    result = results[setup]
    assert "error" not in result, result.get("error")
    assert_close(result["logits"], result["reference"])
    assert result["generate_equal"] and result["batch_equal"] in (None, True), setup
    ran = {tuple(call) for call in result["ops"]}
    route = distributed_worker.SETUPS[setup][1]
    assert {("fused_experts", "cpu"), (ATTENTION[route], "cpu")} <= ran, ran
