"""Build of the optional C++ CPU kernels, the extension ``nlmerge._C`` (csrc/cpu/*.cpp).

Metadata lives in pyproject.toml; this file only adds the extension. The extension is optional:
when it cannot be built (no C++ compiler, no pybind11, a compiler error) the install still
succeeds, prints a warning, and nlmerge runs on its PyTorch reference ops.

Flags: ``-O3 -ffp-contract=off -fno-trapping-math -std=c++17`` (no FMA contraction: the kernels
must match the reference bit for bit; FP exception flags are never read, which lets GCC vectorize
the branch-free selects), ``-fopenmp`` when the compiler and linker accept it (else a single-threaded
build, with a warning), ``-march=native`` when accepted: the extension is built for the machine
that builds it. Environment:

- ``NLMERGE_NATIVE=0``: no ``-march=native`` (a portable build, e.g. for a wheel).
- ``NLMERGE_OPENMP=0``: no OpenMP.
- ``NLMERGE_BUILD_EXT=0``: do not build the extension at all.
- ``NLMERGE_REQUIRE_EXT=1``: fail the install when the extension cannot be built.
"""
import glob
import os
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
HEADERS = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cpu", "*.h")))


def _env_flag(name, default):
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


def _warn(message):
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (nlmerge): {message}\n{bar}\n", file=sys.stderr, flush=True)


class OptionalBuildExt(build_ext):
    """build_ext that probes compiler flags and never fails the install (unless asked to)."""

    def _probe(self, flags, link=False):
        """Whether the compiler accepts ``flags`` on a tiny OpenMP-free/-using C++ file."""
        code = "#ifdef _OPENMP\n#include <omp.h>\n#endif\nint nlmerge_probe() {\n#ifdef _OPENMP\nreturn omp_get_max_threads();\n#else\nreturn 0;\n#endif\n}\n"
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write(code)
            try:
                objects = self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
                if link:
                    self.compiler.link_shared_object(objects, os.path.join(tmp, "probe.so"), extra_postargs=flags)
            except Exception:
                return False
        return True

    def build_extensions(self):
        if not self._probe([]):
            from setuptools.errors import CompileError

            raise CompileError(f"no working C++ compiler ({' '.join(map(str, self.compiler.compiler_so[:1]))})")
        if self.compiler.compiler_type == "msvc":
            from setuptools.errors import CompileError

            raise CompileError("MSVC is not supported (the kernels use GCC/Clang vector extensions)")
        # -fno-trapping-math: FP exception flags are never read, so GCC may compute both arms
        # of a select and vectorize the branch-free loops (values are unchanged: no
        # reassociation, no contraction, IEEE semantics; clang's default anyway)
        compile_args, link_args = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-std=c++17"], []
        if _env_flag("NLMERGE_NATIVE", True) and self._probe(["-march=native"]):
            compile_args.append("-march=native")
        if _env_flag("NLMERGE_OPENMP", True):
            if self._probe(["-fopenmp"], link=True):
                compile_args.append("-fopenmp")
                link_args.append("-fopenmp")
            else:
                compile_args.append("-Wno-unknown-pragmas")
                _warn("the C++ compiler does not accept -fopenmp: building the CPU kernels single-threaded.")
        else:
            compile_args.append("-Wno-unknown-pragmas")
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + compile_args
            ext.extra_link_args = list(ext.extra_link_args or []) + link_args
        print(f"nlmerge: building {[e.name for e in self.extensions]} with {compile_args}", file=sys.stderr)
        super().build_extensions()

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, compile or link error, ...
            if _env_flag("NLMERGE_REQUIRE_EXT", False):
                raise
            _warn(
                f"could not build the C++ CPU kernels (nlmerge._C): {type(exc).__name__}: {exc}\n"
                "nlmerge is installed without them and uses its PyTorch reference ops on CPU (slower).\n"
                "Install a C++17 compiler (with OpenMP) and reinstall to build them."
            )


def _extensions():
    if not _env_flag("NLMERGE_BUILD_EXT", True):
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        _warn("pybind11 is not installed: nlmerge is installed without its C++ CPU kernels.")
        return []
    return [Pybind11Extension("nlmerge._C", SOURCES, depends=HEADERS, include_dirs=["csrc/cpu"], cxx_std=17)]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
