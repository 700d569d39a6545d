"""The examples in the README and in the docstrings of the public functions and the references run and print what
they claim."""

import doctest
import importlib
import re
from pathlib import Path

import pytest
import torch

import qwen_fast

MODULES = [
    f"qwen_fast.{group}.{stem}"
    for group in ("ops", "reference")
    for stem in ("routing", "moe_align", "moe", "attention", "kv_cache")
] + ["qwen_fast.ops._dispatch", "qwen_fast.reference.rope", "qwen_fast.reference.norm"]
MODULES += [f"qwen_fast.nn.{stem}" for stem in ("router", "experts", "moe_block", "attention")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch, "qwen_fast": qwen_fast}, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
    assert result.attempted > 0, f"{name} has no docstring example"


def test_readme_python_examples():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
