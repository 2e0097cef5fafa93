"""Build script: the Python package plus the C CPU backend (see kernels/c/).

The C extension is optional: when no compiler is available the package still
installs, `import fastmerge` works, and backend "auto" falls back to the
PyTorch reference with a warning (on the first merge, and in `fastmerge --version`).

How the user learns it at install time: pip runs this script in a subprocess and shows
its printed output only when the build fails or with `pip install -v` (pypa/pip#6634).
Python warnings are different: pip's hook runner records every UserWarning the backend
raises and re-emits it in pip's own log, at warning level (shown by default) when the
project is installed from a local directory (`pip install -e .` / `pip install .`; from
an index only with -v). So the fallback is announced with warnings.warn, never print:
checked with pip 26.3, where a compiler-less `pip install -e .` ends with the warning.
Older pips, and builds from an sdist, show it only with -v; for them the README's
Quick start states the compiler requirement and the check
(`python -c "import fastmerge._cmerge"`), the first merge warns, and
FASTMERGE_REQUIRE_EXTENSION=1 turns the fallback into a failed install (CI sets it).

Environment switches:
  FASTMERGE_SANITIZE=1          build with AddressSanitizer + UBSan (-O1; kernels/c/sanitize_check.sh)
  FASTMERGE_NO_OPENMP=1         build without OpenMP (single-threaded kernels)
  FASTMERGE_REQUIRE_EXTENSION=1 fail the build instead of warning when the extension cannot be built

No -march flags: wheels stay portable. On x86-64 the hot loops are compiled for
x86-64-v4, x86-64-v3 and baseline and chosen at load time (GCC/Clang target_clones).
"""
import os
import shutil
import tempfile
import warnings

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
        if unix and not shutil.which(cc.compiler_so[0]):
            # say it plainly instead of distutils' "command 'gcc' failed: No such file"
            raise CompileError(f"no C compiler: {cc.compiler_so[0]!r} is not on PATH "
                               "(install gcc or clang, or point CC at one)")
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
                _warn("the C compiler has no working OpenMP (-fopenmp), so the C kernels run "
                      "single-threaded; for multi-threaded kernels use a compiler with OpenMP "
                      "(gcc, or clang with libomp) and reinstall")
        if unix and _compiles(cc, _CLONES_PROBE, []):
            ext.define_macros.append(("FASTMERGE_TARGET_CLONES", "1"))
        ext.extra_compile_args = args
        ext.extra_link_args = link

    def _skip(self, exc, name="fastmerge._cmerge"):
        if _flag("FASTMERGE_REQUIRE_EXTENSION"):
            raise exc
        reason = " ".join(str(exc).split()) or type(exc).__name__
        _warn(f"the C extension {name} was not built: {reason}\n"
              "fastmerge installs without it, and merges on the CPU run on the PyTorch "
              "reference backend, over 100x slower per tensor. For the fast C backend "
              "install a C compiler (gcc or clang) and reinstall; check an install with "
              "`python -c \"import fastmerge._cmerge\"`. FASTMERGE_REQUIRE_EXTENSION=1 makes "
              "this a failed install instead.")


def _warn(message: str) -> None:
    """A UserWarning: pip shows it without -v for local-directory installs (module doc)."""
    warnings.warn(f"fastmerge: {message}", UserWarning, stacklevel=2)


setup(
    packages=["fastmerge", "fastmerge.backends", "fastmerge.io", "fastmerge.kernels",
              "fastmerge.lab"],   # fastmerge.lab: imported only by `python -m fastmerge.lab`
    package_dir={"fastmerge.kernels": "kernels"},
    # kernels/c holds C sources for the extension, not package data to install
    include_package_data=False,
    ext_modules=[
        Extension(
            "fastmerge._cmerge",
            sources=["kernels/c/module.c", "kernels/c/kernels.c", "kernels/c/gram.c",
                     "kernels/c/rank.c", "kernels/c/philox.c"],
            depends=["kernels/c/kernels.h", "kernels/c/convert.h", "kernels/c/gram.h",
                     "kernels/c/rank.h", "kernels/c/philox.h"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
