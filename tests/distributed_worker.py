"""Run by tests/test_distributed.py under torchrun (2 ranks, gloo, CPU): `distributed_worker.py CHECKPOINT OUT`.

For each setup below, every rank loads the tiny checkpoint with that distribution, serves it with qwen_fast (the
registered implementations, or `qwen_fast.patch`), and runs: one forward (logits), greedy `generate` (with a
PagedKVCache after patch) and, where listed, continuous batching (`generate_batch`). Rank 0 compares each with the
same checkpoint run in one process without qwen_fast, appends one JSON line per setup to OUT:
{"setup", "generate_equal", "batch_equal" (null when not run), "ops" ([op, backend] pairs)}, or {"setup", "error"}
when the setup raised, and saves the setup's logits and the one-process ones to OUT.<setup>.pt.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.distributed import DistributedConfig

import qwen_fast

PROMPTS = torch.tensor([[1, 5, 9, 14, 3, 22, 7], [1, 8, 8, 2, 40, 41, 42]])
BATCH_PROMPTS = [[1, 5, 9, 14, 3], [1, 7, 2], [1, 44, 45, 46, 47, 48, 49, 50, 51]]
GREEDY = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
# setup -> (from_pretrained arguments, how qwen_fast serves it, run continuous batching)
SETUPS = {
    "tp_registered": (lambda: {"tp_plan": "auto"}, "registered", True),
    "tp_patch": (lambda: {"tp_plan": "auto"}, "patch", True),
    "tp_ep_all_reduce_registered": (lambda: {"distributed_config": DistributedConfig(tp_size=2, ep_size=2,
                                             ep_implementation="all_reduce")}, "registered", False),
    "tp_ep_patch": (lambda: {"distributed_config": DistributedConfig(tp_size=2, ep_size=2)}, "patch", False),
    "tp_ep_all_to_all_patch": (lambda: {"distributed_config": DistributedConfig(tp_size=2, ep_size=2,
                                        ep_implementation="all_to_all")}, "patch", False),
}  # fmt: skip


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _batched(model) -> list[list[int]]:
    out = model.generate_batch(inputs=BATCH_PROMPTS, generation_config=GREEDY)
    return [o.generated_tokens for o in sorted(out.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))]


def run(path: str, setup: str, reference, out: str) -> dict:
    arguments, route, batching = SETUPS[setup]
    model = AutoModelForCausalLM.from_pretrained(path, **arguments()).eval()
    cache = None
    if route == "patch":
        qwen_fast.patch(model)
        cache = qwen_fast.PagedKVCache.for_model(model, max_batch=PROMPTS.shape[0], block_size=4)
    else:
        name = qwen_fast.register_transformers()
        model.set_experts_implementation(name)
        model.set_attn_implementation(name)
    with torch.no_grad(), qwen_fast.record_backends() as calls:
        logits = _local(model(PROMPTS).logits)
        tokens = model.generate(PROMPTS, generation_config=GREEDY, cache=cache)
        batch = _batched(model) if batching else None
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "reference": reference["logits"]}, f"{out}.{setup}.pt")
    return {
        "setup": setup,
        "generate_equal": torch.equal(tokens, reference["tokens"]),
        "batch_equal": None if batch is None else batch == reference["batch"],
        "ops": sorted({tuple(call) for call in calls}),
    }


def main(path: str, out: str) -> None:
    dist.init_process_group("gloo")
    single = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        reference = {
            "logits": single(PROMPTS).logits,
            "tokens": single.generate(PROMPTS, generation_config=GREEDY),
            "batch": [single.generate(torch.tensor([p]), generation_config=GREEDY)[0, len(p) :].tolist()
                      for p in BATCH_PROMPTS],
        }  # fmt: skip
    for setup in SETUPS:
        try:
            result = run(path, setup, reference, out)
        except Exception as error:  # recorded for the test to report; the ranks fail alike, so none waits
            result = {"setup": setup, "error": f"{type(error).__name__}: {error}"}
        if dist.get_rank() == 0:
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
