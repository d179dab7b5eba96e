"""What ``duet-vlm check`` reports: one ``Result`` per check, the ``Report`` of a run, and the versions
a bug report needs."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field

PASS, FAIL, NOT_APPLICABLE, INFO = "pass", "fail", "n/a", "info"


@dataclass
class Result:
    """One check: ``status`` is ``pass``, ``fail``, ``n/a`` (with the reason in ``detail``) or ``info``;
    ``numbers`` holds what it measured (differences, tolerances, counts, seconds)."""

    key: str
    title: str
    status: str
    detail: str = ""
    numbers: dict = field(default_factory=dict)


@dataclass
class Report:
    """Every check of one run, and what it ran on."""

    setup: dict
    results: list[Result]
    versions: dict

    @property
    def failed(self) -> list[Result]:
        return [result for result in self.results if result.status == FAIL]

    @property
    def ok(self) -> bool:
        return not self.failed

    def result(self, key: str) -> Result:
        for found in self.results:
            if found.key == key:
                return found
        raise KeyError(key)

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "setup": self.setup, "versions": self.versions,
                           "results": [asdict(result) for result in self.results]}, indent=2, default=str)


def versions() -> dict:
    """Python, torch, transformers, duet-vlm, CUDA, flash-attn and the GPU (``None`` where absent)."""
    import importlib.metadata

    import torch
    import transformers

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "duet-vlm": version("duet-vlm"), "accelerate": version("accelerate"),
        "cuda": torch.version.cuda if cuda else None, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "flash-attn": version("flash-attn") or version("flash_attn"),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    }
