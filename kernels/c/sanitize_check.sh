#!/usr/bin/env bash
# Build fastmerge._cmerge with AddressSanitizer + UndefinedBehaviorSanitizer and run
# tests/test_c_backend.py and the C cases of tests/test_geometry.py against that build.
# Exits non-zero on any sanitizer report.
#
# The build happens in a scratch copy of the sources, so the normal in-place extension
# (fastmerge/_cmerge*.so from `pip install -e .`) is left as it is.
#
# Usage: bash kernels/c/sanitize_check.sh [extra pytest args]
# Env:   PYTHON (default python), CC (default gcc), KEEP_TMP=1 keeps the scratch dir.
# Takes about 35 s on 2 cores (sanitized build ~15 s, tests ~15 s).
set -euo pipefail

PYTHON=${PYTHON:-python}
CC=${CC:-gcc}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fastmerge-sanitize.XXXXXX")
if [[ "${KEEP_TMP:-0}" == "1" ]]; then echo "scratch: $TMP"; else trap 'rm -rf "$TMP"' EXIT; fi

libasan=$("$CC" -print-file-name=libasan.so)
libubsan=$("$CC" -print-file-name=libubsan.so)
for lib in "$libasan" "$libubsan"; do
    if [[ ! -e "$lib" ]]; then
        echo "sanitize_check: $CC has no $(basename "$lib") (install the gcc sanitizer runtimes)" >&2
        exit 2
    fi
done

# 1. scratch copy of what the build and the tests need (no compiled objects, no caches)
mkdir -p "$TMP/src"
(cd "$ROOT" && tar --exclude='__pycache__' --exclude='*.so' --exclude='*.egg-info' \
    -cf - setup.py pyproject.toml fastmerge kernels tests) | tar -xf - -C "$TMP/src"
[[ -e "$ROOT/README.md" ]] && cp "$ROOT/README.md" "$TMP/src/"

# 2. sanitized in-place build inside the copy; a failed build is an error here
(cd "$TMP/src" && CC="$CC" FASTMERGE_SANITIZE=1 FASTMERGE_REQUIRE_EXTENSION=1 \
    "$PYTHON" setup.py -q build_ext --inplace --build-temp "$TMP/obj" >"$TMP/build.log" 2>&1) || {
    cat "$TMP/build.log" >&2
    echo "sanitize_check: sanitized build failed" >&2
    exit 1
}

# 3. the tests, with the runtimes preloaded (python itself is not instrumented)
# reports go to files: pytest captures stderr, and a report kills the process mid-capture
mkdir -p "$TMP/san"
cd "$TMP/src"
set +e
LD_PRELOAD="$libasan $libubsan" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:exitcode=99:log_path="$TMP/san/asan" \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=98:log_path="$TMP/san/ubsan" \
FASTMERGE_REQUIRE_EXTENSION=1 PYTHONPATH="$TMP/src" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -m "not interpreter" tests/test_c_backend.py \
    tests/test_geometry.py "$@" 2>&1 | tee "$TMP/test.log"
status=${PIPESTATUS[0]}
set -e

if compgen -G "$TMP/san/*" >/dev/null; then
    cat "$TMP"/san/* >&2
    echo "sanitize_check: sanitizer report above" >&2
    exit 1
fi
if grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$TMP/test.log"; then
    echo "sanitize_check: sanitizer report above" >&2
    exit 1
fi
if [[ $status -ne 0 ]]; then
    echo "sanitize_check: tests failed under the sanitizers (exit $status)" >&2
    exit "$status"
fi
# the tests must really have used the sanitized build
LD_PRELOAD="$libasan $libubsan" ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$TMP/src" \
    "$PYTHON" -c "import fastmerge._cmerge as m, sys; sys.exit(0 if m.__file__.startswith('$TMP/src') else 'sanitize_check: tests imported ' + m.__file__)"
echo "sanitize_check: OK (ASan + UBSan clean)"
