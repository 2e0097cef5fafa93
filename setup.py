"""Build script: the Python package plus the C CPU backend (see kernels/c/).

The C extension is optional: when no compiler is available the package still
installs, `import fastmerge` works, and backend "auto" falls back to the
PyTorch reference with a warning.

Environment switches:
  FASTMERGE_SANITIZE=1          build with AddressSanitizer + UBSan (-O1; kernels/c/sanitize_check.sh)
  FASTMERGE_NO_OPENMP=1         build without OpenMP (single-threaded kernels)
  FASTMERGE_REQUIRE_EXTENSION=1 fail the build instead of warning when the extension cannot be built

No -march flags: wheels stay portable. On x86-64 the hot loops are compiled for
x86-64-v4, x86-64-v3 and baseline and chosen at load time (GCC/Clang target_clones).
"""
import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

_BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)

_OPENMP_PROBE = """
#include <omp.h>
int main(void) {
    int s = 0;
#pragma omp parallel for reduction(+ : s)
    for (int i = 0; i < 8; i++) s += i;
    return s == 28 && omp_get_max_threads() > 0 ? 0 : 1;
}
"""

_CLONES_PROBE = """
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static int f(const int *a, int n) { int s = 0; for (int i = 0; i < n; i++) s += a[i]; return s; }
int main(void) { int a[4] = {1, 2, 3, 4}; return f(a, 4) == 10 ? 0 : 1; }
"""


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _compiles(compiler, code: str, args: list[str]) -> bool:
    """True when ``code`` compiles and links with ``args`` (a quiet probe of the toolchain)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(code)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=args)
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=args)
        except _BUILD_ERRORS:
            return False
    return True


class OptionalBuildExt(build_ext):
    """build_ext that picks flags by probing the compiler and never fails the install."""

    def run(self):
        self._failed = set()
        try:
            super().run()
        except _BUILD_ERRORS as exc:
            self._skip(exc)

    def build_extension(self, ext):
        try:
            self._configure(ext)
            super().build_extension(ext)
        except _BUILD_ERRORS as exc:
            self._failed.add(ext.name)
            self._skip(exc, ext.name)

    def copy_extensions_to_source(self):
        """In-place / editable builds copy only the extensions that were built."""
        built = [e for e in self.extensions if e.name not in getattr(self, "_failed", ())]
        self.extensions, everything = built, self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = everything

    def _configure(self, ext):
        cc = self.compiler
        unix = cc.compiler_type == "unix"
        # -ffp-contract=off: no FMA contraction, so every ISA variant gives identical bits;
        # -fno-trapping-math: lets gcc turn the kernels' selects into SIMD blends (the
        # kernels never read floating-point exception flags).
        args = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-trapping-math"] if unix else ["/O2"]
        link = []
        if unix and _flag("FASTMERGE_SANITIZE"):
            san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                   "-fno-omit-frame-pointer", "-g"]
            args = args + san + ["-O1"]
            link += san
        if not _flag("FASTMERGE_NO_OPENMP"):
            omp = ["-fopenmp"] if unix else ["/openmp"]
            if _compiles(cc, _OPENMP_PROBE, omp):
                args += omp
                link += omp
            else:
                print("fastmerge: compiler has no working OpenMP; C kernels run single-threaded",
                      file=sys.stderr)
        if unix and _compiles(cc, _CLONES_PROBE, []):
            ext.define_macros.append(("FASTMERGE_TARGET_CLONES", "1"))
        ext.extra_compile_args = args
        ext.extra_link_args = link

    def _skip(self, exc, name="C extensions"):
        if _flag("FASTMERGE_REQUIRE_EXTENSION"):
            raise exc
        print(f"WARNING: fastmerge: building {name} failed ({exc}); the C backend is "
              "unavailable and fastmerge falls back to the PyTorch reference backend.",
              file=sys.stderr)


setup(
    packages=["fastmerge", "fastmerge.backends", "fastmerge.io", "fastmerge.kernels"],
    package_dir={"fastmerge.kernels": "kernels"},
    # kernels/c holds C sources for the extension, not package data to install
    include_package_data=False,
    ext_modules=[
        Extension(
            "fastmerge._cmerge",
            sources=["kernels/c/module.c", "kernels/c/kernels.c"],
            depends=["kernels/c/kernels.h", "kernels/c/convert.h"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
