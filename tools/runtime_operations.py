"""Print what duet-vlm adds to a prefill, in tensor operations, per family of the tests' tiny models:
the count of one forward under each method (ratio 0.5) less the unpatched forward's on the same
inputs (``bench.timing.forward_operations``), for one row and for the left-padded batch. The same
numbers on every machine; ``tests/test_runtime_operations.py``'s ``ADDED_OPERATIONS`` is its output.

    python tools/runtime_operations.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import duet_vlm  # noqa: E402
from duet_vlm.bench.timing import forward_operations  # noqa: E402
from models import FAMILIES  # noqa: E402

METHODS = ("full", "fastv", "duet", "visionzip")


def main() -> None:
    print("ADDED_OPERATIONS = {")
    for name, family in FAMILIES.items():
        if family.known_failure:
            continue
        model = family.model()
        for kind in ("one", "batch"):
            inputs = getattr(family, kind)(model)
            plain = forward_operations(model, inputs)
            added = [forward_operations(model, inputs, duet_vlm.make(method, ratio=0.5)) - plain for method in METHODS]
            print(f'    ("{name}", "{kind}"): ({", ".join(map(str, added))}),', flush=True)
    print("}")


if __name__ == "__main__":
    main()
