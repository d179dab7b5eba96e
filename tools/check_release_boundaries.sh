#!/usr/bin/env bash
# The transformers releases either side of every boundary duet_vlm/compat.py names, inside the declared
# range: tests/test_compat.py on each (what compat says of a release against what its code does, each
# family's reduced forward or its refusal by name), so that a boundary put one release off fails on
# the release it misjudges. The oldest (5.19.0) and newest releases have lanes of their own (.ci/run).
#
#   bash tools/check_release_boundaries.sh [VENV]     (default: a temporary one, removed afterwards)
#
# One virtual environment (torch 2.13.0, the package with its test extra), transformers reinstalled for
# each release. About 15 seconds a release to install with pip's cache warm and 10 to test, on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# 5.20.1 | 5.20.2: Qwen3.5's generate encodes its images before the prefill (ENCODES_BEFORE_PREFILL)
# 5.20.2 | 5.21.0: Video-LLaVA's image argument (VIDEO_LLAVA_IMAGES)
# 5.22.2 | 5.23.0: checkpointing's names and place, Gemma 4's shared keys and query cut
# 5.23.0 | 5.24.0: the cache keyword (5.24.0 is CI's newest lane too)
releases=(5.20.1 5.20.2 5.21.0 5.22.2 5.23.0)
venv=${1:-}
if [ -z "$venv" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    venv="$work/venv"
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e ".[test]"
for release in "${releases[@]}"; do
    "$venv/bin/pip" install -q "transformers==$release"
    "$venv/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$release')"
    echo "transformers $release"
    "$venv/bin/python" -m pytest -p no:cacheprovider -p no:warnings -rs tests/test_compat.py
done
