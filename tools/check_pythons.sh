#!/usr/bin/env bash
# The package on other CPython releases than the 3.11 of the README's commands: for each of them, a
# fresh virtual environment made as the README's first command makes one (torch 2.13.0, then the
# package), the package imported, and `duet-vlm demo` run on the shipped model. Each environment is
# removed afterwards. CI runs it on 3.13, the newest release of the declared range
# (requires-python >= 3.11: every transformers release duet-vlm admits requires 3.11).
#
#   bash tools/check_pythons.sh [VERSION ...]        (default: 3.13)
#
# On this project's machines the local CPU wheel of torch 2.13.0 is built for Python 3.11 only, so
# pip takes PyPI's torch 2.13.0 for these (a CUDA build, about 5 GB in the venv; it runs on the CPU).
# About 1.5 minutes a version to install and half a minute for the demo, measured on 2 cores.
# An interpreter is found as pyenv's X.Y (under $PYENV_ROOT or ~/.pyenv/versions, with or without the
# pyenv command) or as `pythonX.Y` on PATH; one that is missing fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.13)

interpreter() {  # the path of a working CPython X.Y, or nothing
    local version=$1 candidate
    for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".*/bin/python 2>/dev/null | sort -V -r); do
        if "$candidate" -c pass 2>/dev/null; then echo "$candidate"; return; fi
    done
    if command -v "python$version" >/dev/null 2>&1 && "python$version" -c pass 2>/dev/null; then
        command -v "python$version"
    fi
    return 0  # nothing printed: none found (the caller says so)
}

for version in "${versions[@]}"; do
    py=$(interpreter "$version")
    [ -n "$py" ] || { echo "no CPython $version found (on PATH as python$version, or under pyenv)"; exit 1; }
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$py" -m venv "$work/venv"
    "$work/venv/bin/pip" install -q torch==2.13.0
    "$work/venv/bin/pip" install -q -e "$root"
    "$work/venv/bin/python" - "$version" <<'PY'
import sys
import duet_vlm, torch, transformers
expected = tuple(int(part) for part in sys.argv[1].split("."))
assert sys.version_info[:2] == expected, sys.version
print(f"Python {sys.version.split()[0]}: duet_vlm imported (torch {torch.__version__}, transformers {transformers.__version__})")
PY
    ( cd "$work" && "$work/venv/bin/duet-vlm" demo )
    test -s "$work/duet_demo.png" || { echo "Python $version: the demo wrote no duet_demo.png"; exit 1; }
    echo "Python $version: the demo ran"
    rm -rf "$work"
    trap - EXIT
done
