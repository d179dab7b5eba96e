"""What a call of the lent GPU machine carries (the device tool's limit: 64 MiB): the working tree
that travels (tracked files, and untracked ones git does not ignore) plus the paths named to carry.

    python3 tools/device_carry.py [PATH ...]      # prints the bytes; exit 1 over the limit
    python3 tools/device_carry.py --aside [PATH ...]    # first moves ASIDE out of the tree, then the same
    python3 tools/device_carry.py --restore       # puts ASIDE back

The tree with both shipped demo models and the official replays' vectors is over the limit on its own.
What no device script reads, ``ASIDE`` (the vectors of tests/data: the CUDA suite and the GPU bench build
their models from configs), is moved into ``.aside/`` (excluded from git) for the call and put back after
it; a tracked file that is absent from the tree does not travel.

Used by tools/gpu_bench.sh (after fetching the wheels into .whl/) and tests/test_gpu_bench.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LIMIT = 64 * 2**20
ROOT = Path(__file__).resolve().parent.parent
#: What is moved out of the tree for a device call: read by no device script.
ASIDE = ("tests/data/vectors",)
PARKED = ".aside"


def travelling_bytes(root: Path = ROOT, aside: tuple[str, ...] = ()) -> int:
    """Bytes of the files that travel with every call: tracked, and untracked but not ignored (without
    the ``aside`` folders, which ``--aside`` moves out for the call)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    names = [name.decode() for name in listed if name]
    names = [name for name in names if not any(name == a or name.startswith(a + "/") for a in aside)]
    return sum((root / name).stat().st_size for name in names if (root / name).is_file())


def set_aside(root: Path = ROOT) -> None:
    """Move ``ASIDE`` into ``.aside/`` (excluded from git, so it does not travel)."""
    exclude = root / ".git" / "info" / "exclude"
    if f"/{PARKED}/" not in (exclude.read_text().splitlines() if exclude.exists() else []):
        with exclude.open("a") as file:
            file.write(f"/{PARKED}/\n")
    for path in ASIDE:
        target = root / PARKED / path
        if (root / path).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            (root / path).rename(target)


def restore(root: Path = ROOT) -> None:
    """Put ``ASIDE`` back where it was."""
    for path in ASIDE:
        parked = root / PARKED / path
        if parked.exists():
            if (root / path).exists():
                raise FileExistsError(f"{path} is in the tree and in {PARKED}/: resolve by hand")
            parked.rename(root / path)


def carried_bytes(paths: list[Path]) -> int:
    """Bytes of the carried paths (files, or folders walked)."""
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return total


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--restore"]:
        restore()
        sys.exit(0)
    if args[:1] == ["--aside"]:
        set_aside()
        args = args[1:]
    carried = [ROOT / arg for arg in args]
    tree, extra = travelling_bytes(), carried_bytes(carried)
    print(f"working tree {tree / 2**20:.1f} MiB + carried {extra / 2**20:.1f} MiB = {(tree + extra) / 2**20:.1f} MiB "
          f"of {LIMIT / 2**20:.0f}")
    sys.exit(0 if tree + extra <= LIMIT else 1)
