"""Static GPU check, no GPU needed: compile every Triton kernel config for sm_80 and sm_90, read the extension's
CUDA kernels with cuobjdump, print registers / shared memory / spills per kernel, exit non-zero on any problem.

    python -m qwen_fast.gpu_check [--arch 80 90] [--require-cuda]

A problem is: a Triton config that fails to compile, a kernel that uses local memory or stack (a register spill at
REG 255, or a local array), shared memory past the arch's limit, or with --require-cuda an extension that lacks
SASS for a requested arch. Triton configs come from each kernels/ module's compile_specs(), built from the same
config function its launcher uses.
"""

import argparse
import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Largest dynamic shared memory per block (bytes) a kernel may opt in to.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass
class Usage:
    kernel: str
    arch: int
    regs: int
    stack: int
    shared: int
    local: int

    def problems(self) -> list[str]:
        found = []
        if self.stack or self.local:
            found.append(f"spills or local memory (STACK {self.stack} B, LOCAL {self.local} B at REG {self.regs})")
        if self.shared > SHARED_LIMIT.get(self.arch, SHARED_LIMIT[80]):
            found.append(f"shared memory {self.shared} B > sm_{self.arch} limit {SHARED_LIMIT[self.arch]} B")
        return found


def cuobjdump() -> str:
    """Triton's bundled cuobjdump, else one on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise SystemExit("gpu_check: no cuobjdump (neither triton's bundled one nor one on PATH)")
    return found


def parse_resource_usage(text: str) -> list[tuple[int | None, str, tuple[int, int, int, int]]]:
    """(arch, function, (REG, STACK, SHARED, LOCAL)) from `cuobjdump --dump-resource-usage` output."""
    arch, function, rows = None, None, []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = sm_"):
            arch = int(line.removeprefix("arch = sm_").rstrip("a"))
        elif line.startswith("Function "):
            function = line.removeprefix("Function ").rstrip(":")
        elif (match := _RESOURCE.search(line)) and function is not None:
            rows.append((arch, function, tuple(int(g) for g in match.groups())))
            function = None
    return rows


def demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def spec_usages(spec, arch: int, label: str, tool: str) -> list[Usage]:
    """Compile one CompileSpec for sm_<arch> (no GPU needed) and read its resource usage with cuobjdump. Raises the
    compiler's exception when it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.signature)  # arguments a real launch sees 16-byte aligned (CompileSpec.aligned)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True)
    return [
        Usage(label, arch, regs, stack, compiled.metadata.shared, local)
        for _, _, (regs, stack, _, local) in parse_resource_usage(text.stdout)
    ]


def triton_usages(archs: list[int]) -> tuple[list[Usage], list[str]]:
    import qwen_fast.kernels as kernels_package

    usages, failures = [], []
    tool = cuobjdump()
    for info in pkgutil.iter_modules(kernels_package.__path__):
        module = importlib.import_module(f"qwen_fast.kernels.{info.name}")
        for spec in getattr(module, "compile_specs", list)():
            name = f"{info.name}.{spec.kernel.__name__}[{spec.label}, warps={spec.num_warps}]"
            for arch in archs:
                if spec.archs and arch not in spec.archs:
                    continue  # a per-architecture config: the others never launch it
                try:
                    usages += spec_usages(spec, arch, name, tool)
                except Exception as error:  # any compiler error is a finding, reported with the config
                    failures.append(f"{name} sm_{arch}: failed to compile: {str(error).splitlines()[0]}")
    return usages, failures


def native_usages(archs: list[int], require_cuda: bool) -> tuple[list[Usage], list[str]]:
    from qwen_fast import _native

    if _native.LOAD_ERROR is not None:
        return [], ([f"the extension is not built: {_native.LOAD_ERROR}"] if require_cuda else [])
    library = sys.modules["qwen_fast._C"].__file__
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", library], capture_output=True, text=True).stdout
    rows = [row for row in parse_resource_usage(text) if row[0] in archs]
    names = [name.split("(")[0] for name in demangle([function for _, function, _ in rows])]
    usages = [Usage(name, arch, r, s, sh, lo) for name, (arch, _, (r, s, sh, lo)) in zip(names, rows, strict=True)]
    failures = []
    if require_cuda:
        found = {u.arch for u in usages}
        failures = [f"the extension has no CUDA kernels for sm_{a} ({library})" for a in archs if a not in found]
    return usages, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (default: 80 90)")
    parser.add_argument("--require-cuda", action="store_true", help="fail unless _C has SASS for every --arch")
    args = parser.parse_args(argv)

    triton_found, triton_failed = triton_usages(args.arch)
    native_found, native_failed = native_usages(args.arch, args.require_cuda)
    problems = triton_failed + native_failed
    print(f"{'kernel':<100} {'arch':>5} {'REG':>4} {'SHARED':>7} {'STACK':>6} {'LOCAL':>6}")
    for usage in triton_found + native_found:
        print(
            f"{usage.kernel[:100]:<100} sm_{usage.arch:<2} {usage.regs:>4} {usage.shared:>7} {usage.stack:>6} "
            f"{usage.local:>6}"
        )
        problems += [f"{usage.kernel} sm_{usage.arch}: {p}" for p in usage.problems()]
    print(
        f"\n{len(triton_found)} Triton kernel compilations and {len(native_found)} extension kernels checked "
        f"for sm_{', sm_'.join(map(str, args.arch))}"
    )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
