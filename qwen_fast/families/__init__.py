"""The transformers model families qwen_fast serves: one file per family in this package, each declaring `FAMILY`.

A family file says everything qwen_fast needs about a family: which transformers 5.x classes to take (by exact module
path and name, so a remote-code class that borrows a name is not taken for it), how its router routes, which of its
MoE block's submodules are shared experts, how its attention is served, and a tiny config for the tests. The tables
of qwen_fast.nn (nn/_hf.py), `qwen_fast.patch` and the tests' tiny models are all derived from `FAMILIES`: adding a
family is adding its file here. Nothing here imports transformers.
"""

import importlib
import pkgutil

from .family import Family, RouterSpec

FAMILIES: tuple[Family, ...] = tuple(
    importlib.import_module(f"{__name__}.{info.name}").FAMILY
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
    if info.name != "family"
)

__all__ = ["FAMILIES", "Family", "RouterSpec"]
