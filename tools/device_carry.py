"""What a call of the lent GPU machine carries (the device tool's limit: 64 MiB): the working tree
that travels (tracked files, and untracked ones git does not ignore) plus the paths named to carry.

    python3 tools/device_carry.py [PATH ...]      # prints the bytes; exit 1 over the limit

Used by tools/gpu_bench.sh (after fetching the wheels into .whl/) and tests/test_gpu_bench.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LIMIT = 64 * 2**20
ROOT = Path(__file__).resolve().parent.parent


def travelling_bytes(root: Path = ROOT) -> int:
    """Bytes of the files that travel with every call: tracked, and untracked but not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in listed if name and (root / name.decode()).is_file())


def carried_bytes(paths: list[Path]) -> int:
    """Bytes of the carried paths (files, or folders walked)."""
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return total


if __name__ == "__main__":
    carried = [ROOT / arg for arg in sys.argv[1:]]
    tree, extra = travelling_bytes(), carried_bytes(carried)
    print(f"working tree {tree / 2**20:.1f} MiB + carried {extra / 2**20:.1f} MiB = {(tree + extra) / 2**20:.1f} MiB "
          f"of {LIMIT / 2**20:.0f}")
    sys.exit(0 if tree + extra <= LIMIT else 1)
