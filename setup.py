"""Build script: the Python package plus the C CPU backend (see kernels/c/).

The C extension is optional: when no compiler is available the package still
installs, `import fastmerge` works, and backend "auto" falls back to the
PyTorch reference with a warning.
"""
from setuptools import setup

setup(
    packages=["fastmerge", "fastmerge.backends", "fastmerge.io", "fastmerge.kernels"],
    package_dir={"fastmerge.kernels": "kernels"},
)
