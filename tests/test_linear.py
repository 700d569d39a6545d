"""linear: what the op table (qwen_fast/cli/samples/linear.py) cannot say. The cpu kernel's bits do not depend on the
thread count and it is right for any row count; bad arguments are named errors. In a patched model the q/k/v/o
projections and the LM head run the op in the decode step (logits within fp32's tolerance of transformers, the same
greedy tokens), a forced cpu backend runs prefill too, and undo() puts the LM head back."""

import pytest
import torch
from numerics import assert_close
from tiny_models import tiny_model

import qwen_fast
from qwen_fast.ops.linear import MAX_ROWS


def _args(rows: int, k: int, n: int, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_for_every_thread_count(dtype):
    x, w, b = _args(5, 1000, 301, dtype)  # enough weight per task that two threads split the columns
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            with qwen_fast.use_backend("cpu"):
                results.append(qwen_fast.linear(x, w, b))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    assert_close(results[0], torch.nn.functional.linear(x.float(), w.float(), b.float()), dtype)


def test_any_row_count():
    """The kernel is right past MAX_ROWS too (the modules stop calling it there: F.linear is faster)."""
    x, w, b = _args(MAX_ROWS + 21, 100, 37)
    with qwen_fast.use_backend("cpu"), qwen_fast.record_backends() as ran:
        out = qwen_fast.linear(x.view(1, MAX_ROWS + 21, 100), w, b)
    assert ran == [("linear", "cpu")]
    assert_close(out[0], torch.nn.functional.linear(x, w, b))


def test_bad_arguments():
    x, w, b = _args(2, 8, 4)
    with pytest.raises(TypeError, match="input must be float32 or float16 or bfloat16, got torch.int64"):
        qwen_fast.linear(x.long(), w)
    with pytest.raises(TypeError, match="weight must be float32, got torch.bfloat16"):
        qwen_fast.linear(x, w.bfloat16())
    with pytest.raises(ValueError, match=r"weight \[N, K\] = \(4, 7\) must match input \[\*, K\] = \(2, 8\) in K"):
        qwen_fast.linear(x, w[:, :7])
    with pytest.raises(ValueError, match=r"bias must be \[N\] from weight \[N, K\] = \(4,\), got \(5,\)"):
        qwen_fast.linear(x, w, torch.zeros(5))
    with pytest.raises(ValueError, match="input must be"):
        qwen_fast.linear(torch.tensor(1.0), w)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        qwen_fast.linear(x, [[1.0] * 8])


def _decode_step(model, prompt):
    """Logits of one decode step after a prefill of `prompt` (DynamicCache), and the backends the step ran."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        with qwen_fast.record_backends() as ran:
            logits = model(first, cache=cache, use_cache=True).logits
    return logits, ran


def test_patched_decode_runs_the_op_and_matches_transformers():
    model = tiny_model("qwen3_moe")
    prompt = torch.randint(2, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    lm_head = model.lm_head
    expected, _ = _decode_step(model, prompt)
    expected_tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)
    handle = qwen_fast.patch(model)
    assert isinstance(model.lm_head, qwen_fast.nn.Linear) and model.lm_head.weight is lm_head.weight
    actual, ran = _decode_step(model, prompt)
    assert_close(actual, expected)
    layers = model.config.num_hidden_layers
    assert ran.count(("linear", "cpu")) == 4 * layers + 1  # q, k, v, o per layer, and the LM head
    assert torch.equal(model.generate(prompt, max_new_tokens=16, do_sample=False), expected_tokens)
    handle.undo()
    assert model.lm_head is lm_head and type(lm_head) is torch.nn.Linear
    with qwen_fast.record_backends() as ran:
        restored, _ = _decode_step(model, prompt)
    assert torch.equal(restored, expected) and not ran


def test_forced_cpu_runs_prefill_and_decode():
    """A prompt of more than MAX_ROWS tokens: the modules call F.linear there, so forcing cpu does not error."""
    model = tiny_model("qwen3_moe")
    prompt = torch.randint(2, 97, (1, MAX_ROWS + 3), generator=torch.Generator().manual_seed(2))
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with qwen_fast.patch(model), qwen_fast.use_backend("cpu"), qwen_fast.record_backends() as ran:
        actual = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(actual, expected)
    assert ("linear", "cpu") in ran and all(backend == "cpu" for _, backend in ran)
