"""Static GPU check, no GPU needed: compile every Triton kernel config for sm_80 and sm_90, read the extension's
CUDA kernels with cuobjdump, print registers / shared memory / spills per kernel, exit non-zero on any problem.

    python -m qwen_fast.gpu_check [--arch 80 90] [--require-cuda] [--modules moe_gemm ...] [--jobs N]

A problem is: a Triton config that fails to compile, a kernel that uses local memory or stack (a register spill at
REG 255, or a local array), shared memory past the arch's limit, or with --require-cuda an extension that lacks
SASS for a requested arch. The Triton kernels compiled are the launches each kernels/ module's compile_specs()
records from its own launcher at model shapes, each specialised by Triton's launch-time binder for the arch (ints
equal to 1 as constants, 16-divisible ints and pointers as aligned: kernels/compile_spec.py), once per distinct
specialisation; a launch is compiled for the archs its config is for (every config the launcher can pick there).
"""

import argparse
import importlib
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
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
    """Compile one recorded launch (kernels/compile_spec.py) for sm_<arch> as the JIT would compile it there (no GPU
    needed) and read its resource usage with cuobjdump. Raises the compiler's exception when it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget

    from qwen_fast.kernels.compile_spec import specialize

    source, options = specialize(spec, arch)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True)
    return [
        Usage(label, arch, regs, stack, compiled.metadata.shared, local)
        for _, _, (regs, stack, _, local) in parse_resource_usage(text.stdout)
    ]


def describe(spec, arch: int) -> str:
    """A launch in one line: its label, the constants the JIT sees (tiles, flags, ints equal to 1), warps, stages."""
    from qwen_fast.kernels.compile_spec import specialize

    source, _ = specialize(spec, arch)
    names = list(source.signature)
    constants = " ".join(
        f"{names[path[0]]}={value}" for path, value in source.constants.items() if value is not None and len(path) == 1
    )
    pointers = ",".join(dict.fromkeys(t for t in source.signature.values() if t.startswith("*")))
    budget = f" maxnreg={spec.kwargs['maxnreg']}" if spec.kwargs.get("maxnreg") else ""
    return f"{spec.label} {pointers} {constants} warps={spec.num_warps} stages={spec.num_stages}{budget}".strip()


_JOBS: list = []  # (spec, arch, name) of triton_usages, read by its forked workers by index


def _compile_job(index: int) -> tuple[list[Usage], str | None]:
    """(the usages, None) of _JOBS[index], or ([], the failure): any compiler error is a finding, with the config."""
    spec, arch, name = _JOBS[index]
    try:
        return spec_usages(spec, arch, name, cuobjdump()), None
    except Exception as error:
        return [], f"{name} sm_{arch}: failed to compile: {str(error).splitlines()[0]}"


def triton_usages(archs: list[int], modules: list[str] | None = None, jobs: int = 1) -> tuple[list[Usage], list[str]]:
    """Compile every distinct recorded launch of the kernels/ modules (all, or `modules`) for each arch, on `jobs`
    forked processes (the specs hold kernels and meta tensors: the workers inherit them instead of unpickling)."""
    import qwen_fast.kernels as kernels_package
    from qwen_fast.kernels.compile_spec import unique

    cuobjdump()  # fail early without one
    _JOBS.clear()
    for info in pkgutil.iter_modules(kernels_package.__path__):
        if modules and info.name not in modules:
            continue
        module = importlib.import_module(f"qwen_fast.kernels.{info.name}")
        specs = getattr(module, "compile_specs", list)()
        for arch in archs:
            for spec in unique(specs, arch):
                _JOBS.append((spec, arch, f"{info.name}.{spec.name}[{describe(spec, arch)}]"))
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_job, range(len(_JOBS)), chunksize=4))
    else:
        results = [_compile_job(index) for index in range(len(_JOBS))]
    usages = [usage for found, _ in results for usage in found]
    return usages, [failure for _, failure in results if failure is not None]


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
    parser.add_argument("--modules", nargs="+", metavar="NAME", help="only these kernels/ modules (e.g. moe_gemm)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: the CPUs)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    triton_found, triton_failed = triton_usages(args.arch, args.modules, args.jobs)
    native_found, native_failed = native_usages(args.arch, args.require_cuda)
    problems = triton_failed + native_failed
    print(f"{'arch':<5} {'REG':>4} {'SHARED':>7} {'STACK':>6} {'LOCAL':>6}  kernel")
    for usage in triton_found + native_found:
        print(f"sm_{usage.arch:<2} {usage.regs:>4} {usage.shared:>7} {usage.stack:>6} {usage.local:>6}  {usage.kernel}")
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
