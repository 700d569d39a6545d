"""Builds qwen_fast._C (CPU kernels always; CUDA kernels when possible) and installs kernels/ as qwen_fast.kernels.

Install against the torch already in the environment:  pip install -v --no-build-isolation .
(-v shows the compiler lines as they run; without it pip prints only "still running..." for the whole build.) The
build prints what it compiles (CPU and/or CUDA kernels, the CUDA arches) and a rough time estimate first.

Environment:
  QWEN_FAST_FORCE_CUDA=1   build the CUDA kernels even where auto-detection would not (fails if it cannot)
  QWEN_FAST_SKIP_CUDA=1    never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST     CUDA arches; default "8.0;9.0+PTX". The build never queries a GPU.
  MAX_JOBS                 parallel compile jobs; default from cores and memory (about 3 GiB per nvcc job)
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "8.0;9.0+PTX"
# Rough compile cost in job-minutes, measured on a 2-core VM (torch 2.14 headers): one C++ source, and one CUDA
# source per arch (a "+PTX" arch costs about one more).
CPP_MINUTES, CU_MINUTES_PER_ARCH = 2.5, 9.0


def read_sources() -> list[str]:
    """csrc/sources.txt, the one source list (CMakeLists.txt reads it too)."""
    lines = (CSRC / "sources.txt").read_text().splitlines()
    return [f"csrc/{line.strip()}" for line in lines if line.strip() and not line.lstrip().startswith("#")]


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def default_max_jobs() -> int:
    """One job per core, but no more than free memory allows (nvcc with torch headers peaks near 3 GiB)."""
    try:
        pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        by_memory = max(1, pages * page_size // (3 << 30))
    except (ValueError, OSError, AttributeError):
        by_memory = 1
    return max(1, min(os.cpu_count() or 1, by_memory))


def announce(sources: list[str], archs: str | None) -> None:
    """What the build compiles, and about how long it takes, before it starts (pip shows it with -v, or on failure)."""
    cpp = [s for s in sources if not s.endswith(".cu")]
    cu = [s for s in sources if s.endswith(".cu")] if archs else []
    jobs = int(os.environ["MAX_JOBS"])
    arch_list = (archs or "").replace(",", ";").replace(" ", ";").split(";")
    arch_count = sum(1 + arch.endswith("+PTX") for arch in arch_list if arch)
    minutes = (len(cpp) * CPP_MINUTES + len(cu) * arch_count * CU_MINUTES_PER_ARCH) / jobs
    what = f"CPU kernels ({len(cpp)} C++ sources)"
    if archs:
        what += f" and CUDA kernels ({len(cu)} CUDA sources for TORCH_CUDA_ARCH_LIST={archs})"
    print(
        f"qwen_fast: building {what} with MAX_JOBS={jobs}; roughly {max(1, round(minutes))} minutes on a 2-core "
        "machine (pip install -v shows each compile; QWEN_FAST_SKIP_CUDA=1 skips the CUDA kernels)",
        flush=True,
    )


def want_cuda(torch, cuda_home: str | None) -> bool:
    if flag("QWEN_FAST_SKIP_CUDA"):
        return False
    has_toolkit = torch.version.cuda is not None and cuda_home is not None
    if flag("QWEN_FAST_FORCE_CUDA"):
        if not has_toolkit:
            raise RuntimeError(
                f"QWEN_FAST_FORCE_CUDA=1 but the CUDA kernels cannot be built: torch.version.cuda="
                f"{torch.version.cuda!r}, CUDA_HOME={cuda_home!r} (install a CUDA build of torch and nvcc)"
            )
        return True
    return has_toolkit


def cuda_include_dirs() -> list[str]:
    """The pip CUDA packages' headers (cusparse.h etc.), which torch's CUDA headers need beside a minimal nvcc."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            path = Path(base) / sub
            if path.is_dir():
                dirs.append(str(path))
    return dirs


def nvcc_library_dirs(cuda_home: str) -> list[str]:
    """Where nvcc itself finds libcudart: CUDA_HOME may point at a wrapper (e.g. /usr/local with bin/nvcc a script)."""
    import re
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cu"
        source.write_text("")
        result = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "-dryrun", "-c", str(source), "-o", str(Path(tmp) / "probe.o")],
            capture_output=True,
            text=True,
        )
    line = next((x for x in result.stderr.splitlines() if x.startswith("#$ LIBRARIES=")), "")
    return [d for d in re.findall(r'-L"?([^"\s]+)"?', line) if not d.endswith("stubs") and Path(d).is_dir()]


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    sources = read_sources()
    # -fopenmp: at::parallel_for in the CPU kernels is a header template that runs serially unless the extension
    # itself is compiled with OpenMP; libgomp.so.1 resolves to the copy libtorch already loaded (one thread pool).
    cxx = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"]
    if want_cuda(torch, CUDA_HOME):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        announce(sources, os.environ["TORCH_CUDA_ARCH_LIST"])
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        return [
            CUDAExtension(
                "qwen_fast._C",
                sources,
                include_dirs=[str(CSRC)] + cuda_include_dirs(),
                library_dirs=nvcc_library_dirs(CUDA_HOME),
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    print("qwen_fast: no CUDA kernels (QWEN_FAST_SKIP_CUDA=1, a CPU build of torch, or no nvcc)")
    announce(sources, None)
    return [
        CppExtension(
            "qwen_fast._C",
            [s for s in sources if not s.endswith(".cu")],
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["qwen_fast", "qwen_fast.*"]) + ["qwen_fast.kernels"],
    package_dir={"qwen_fast.kernels": "kernels"},
    package_data={"qwen_fast.configs": ["*/*.json"]},  # tuned tables: configs/<kernel>/<device>.json
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    entry_points={},
)
