"""Test configuration: without a GPU, Triton kernels run in the interpreter (CPU)."""
import gc
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _undo_gc_freeze():
    """Undo the ``gc.freeze()`` of a ``fastmerge.cli.main`` call made in-process.

    The CLI freezes every object alive after its imports (a short-lived process needs no
    more collection scans of them). Inside the test process that would last for the rest
    of the session, and once Triton was imported the frozen objects include cycles that
    hold libtriton's nanobind objects (``ir.attribute``): frozen objects are never
    collected, not even at interpreter exit, so nanobind reported them as ~30 lines of
    "nanobind: leaked ... instances/types/functions" after the test summary
    (``python -c "import triton, gc; gc.freeze()"`` shows the same). Unfreezing hands
    them back to the collector: nothing leaks and nothing is hidden, unlike silencing
    stderr at exit or nanobind's leak warnings (libtriton exposes no switch for those).
    """
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
