"""The examples in the README and in the docstrings of the public functions and the references run and print what
they claim."""

import doctest
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import qwen_fast

# Every module of the package whose source holds a docstring example (no list to keep in sync).
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(qwen_fast.__path__, "qwen_fast.")
    if not info.ispkg
    and info.name != "qwen_fast._C"
    and ">>> " in Path(importlib.util.find_spec(info.name).origin).read_text()
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch, "qwen_fast": qwen_fast}, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
    assert result.attempted > 0, f"{name} has no docstring example"


def test_public_modules_have_examples():
    assert {
        "qwen_fast.ops.routing",
        "qwen_fast.ops.rope",
        "qwen_fast.nn.attention",
        "qwen_fast.cache.paged_kv_cache",
    } <= set(MODULES)


def test_readme_python_examples():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize("document", ["README.md", "DESIGN.md"])
def test_local_links_stay_in_the_repository_and_resolve(document):
    """Every relative link and image of the README and DESIGN.md names a file of this repository (a clone has no
    ../shared); the README links the design document."""
    root = Path(__file__).resolve().parents[1]
    text = (root / document).read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
    for target in targets:
        path = (root / target.split("#")[0]).resolve()
        assert path.is_relative_to(root) and path.exists(), f"{document} links {target}, not a file of the repository"
    if document == "README.md":
        assert "DESIGN.md" in targets
