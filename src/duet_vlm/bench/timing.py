"""The one timer of every benchmark: variants timed round-robin in the same process, compared per round.

Timings on a shared machine are noisy, so every variant is timed in the same process, interleaved
round by round, and reported as a ratio to a reference measured in the same rounds (the median over
rounds). ``LanguageModelTimer`` splits a forward's time into its language-model part; ``PeakRSS``
measures the memory a timed call adds; ``OperationClock`` counts tensor operations instead of
seconds, the same on every machine.

>>> times = interleaved({"a": lambda: None, "b": lambda: None}, rounds=3)
>>> sorted(median_ratio({"base": [1.0, 2.0], "x": [0.5, 1.0]}, "base").items())
[('base', 1.0), ('x', 0.5)]
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, warmup: int = 1, progress=None,
                order: Callable[[int], list[str]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every variant, timed round-robin so that drifts in load hit all alike.

    ``order(round number)``: the names in the order that round runs them (``pairs_swapped``);
    by default every round runs them in the order of ``variants``.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for number in range(rounds):
        for name in (list(variants) if order is None else order(number)):
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress()
    return times


def pairs_swapped(groups: list[list[str]]) -> Callable[[int], list[str]]:
    """A round order for ``interleaved``: the groups one after another, each group's names in reverse
    in every other round. What ran just before can change a forward's time: timed right after the
    unreduced forward and its ideal, LLaVA-1.5's DUET at 0.11 read 1.028 of its ideal when it ran
    first of the two and 0.994 when its ideal did, in the same 15 rounds otherwise
    (docs/bench/order_effect). In a fixed order the first of a variant and its ideal follows the
    previous group in every round; with the pair swapped, each is first in one round of every two,
    and a pair of rounds (``round_pairs``) reads both alike.

    >>> order = pairs_swapped([["unreduced"], ["duet", "ideal"]])
    >>> order(0), order(1)
    (['unreduced', 'duet', 'ideal'], ['unreduced', 'ideal', 'duet'])
    """
    def order(number: int) -> list[str]:
        return [name for group in groups for name in (group[::-1] if number % 2 else group)]

    return order


def paired_rounds(rounds: int) -> int:
    """The rounds a benchmark read per pair of rounds (``round_pairs``) runs: ``rounds``, or one more
    where it is odd.

    >>> paired_rounds(15), paired_rounds(16)
    (16, 16)
    """
    return rounds + rounds % 2


def round_pairs(values: list) -> list:
    """Per pair of consecutive rounds (0 and 1, 2 and 3, ...), the mean of the two: numbers, or dicts
    of numbers key by key. Of rounds timed in the order of ``pairs_swapped`` each pair ran each
    group's names once in each order, so a ratio read per pair carries no order effect. An odd last
    round is left out.

    >>> round_pairs([1.0, 3.0, 2.0, 4.0, 9.0])
    [2.0, 3.0]
    >>> round_pairs([{"attention": 1.0}, {"attention": 2.0}])
    [{'attention': 1.5}]
    """
    pairs = zip(values[0::2], values[1::2])
    if values and isinstance(values[0], dict):
        return [{key: (a[key] + b[key]) / 2 for key in a} for a, b in pairs]
    return [(a + b) / 2 for a, b in pairs]


#: What ``keep_freed_memory`` sets, by name, and each name's ``mallopt`` parameter (malloc.h).
KEPT_MEMORY = {"mmap_threshold": 32 << 20, "trim_threshold": (1 << 31) - 1, "top_pad": 1 << 30}
_MALLOPT = {"mmap_threshold": -3, "trim_threshold": -1, "top_pad": -2}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD


def keep_freed_memory() -> dict | None:
    """Have glibc's allocator keep what a forward frees for the next one: blocks up to 32 MiB from
    its heap instead of fresh mappings, and no heap returned to the system. Returns the settings, or
    ``None`` where the C library is not glibc (nothing changed).

    With glibc's defaults a tensor's pages are handed back when it is freed and faulted in again,
    zeroed, when the next one is allocated, and how often that happens depends on what else stays
    alive: a forward that keeps a KV cache (every real variant) then pays page faults inside its
    matrix products that its ideal (no cache) does not. Measured on LLaVA-1.5's geometry: with the
    defaults, FastV's layers after its boundary ran 1.7% slower than the same layers of its ideal;
    with this setting, equally fast, and both about 6% faster (docs/benchmarks.md). PyTorch's CPU
    performance guide advises an allocator that keeps freed memory (jemalloc, tcmalloc) for the same
    reason. Process-wide and not undone: a benchmark's own process."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for name, value in KEPT_MEMORY.items():
        if mallopt(_MALLOPT[name], value) != 1:
            raise RuntimeError(f"glibc's mallopt refused {name}={value}")
    return dict(KEPT_MEMORY)


def processor(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """What the timings ran on, for comparing runs across machines: the CPU's model as the kernel
    names it (``cpuinfo``'s first processor, else ``platform.processor()``), the vector instructions
    PyTorch's CPU kernels chose (``torch.backends.cpu.get_cpu_capability()``: ``AVX2``, ``AVX512``,
    ...) and the cores. The same code's ratios can differ between machines: what a forward spends
    outside its matrix products is a larger share where those run faster."""
    name = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as info:
            for line in info:
                key, _, value = line.partition(":")
                if not key.strip():  # the first processor's block ends
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:  # a virtual machine may give only the product line ("AMD EPYC"): add the numbers
        name = fields["model name"] + "".join(
            f", {key} {fields[key]}" for key in ("cpu family", "model") if key in fields)
    return {"model": name, "capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count()}


def median_ratio(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of (variant / baseline) measured in the same round."""
    return {
        name: statistics.median(t / b for t, b in zip(values, times[baseline])) for name, values in times.items()
    }


class LanguageModelTimer:
    """Seconds spent inside the language model (decoder layers and the reducer's hooks) per forward;
    with another ``clock`` (``OperationClock.read``), what it counts instead of seconds.

    >>> with LanguageModelTimer(model) as timer:                       # doctest: +SKIP
    ...     model(**inputs)
    >>> timer.seconds                                                  # doctest: +SKIP
    [0.41]
    """

    def __init__(self, model, clock: Callable[[], float] = time.perf_counter):
        self.language_model = model.model.language_model
        self.clock = clock
        self.seconds: list[float] = []

    def __enter__(self):
        start = {}
        self._handles = [
            self.language_model.register_forward_pre_hook(lambda *_: start.__setitem__("t", self.clock())),
            self.language_model.register_forward_hook(lambda *_: self.seconds.append(self.clock() - start["t"])),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


class LayerKindTimer:
    """Seconds spent inside the decoder layers of each kind per forward (``ModelAdapter.layer_kinds``:
    attention, and the linear attention of a hybrid decoder), from each layer's own call to its
    return: a reducer's work before a layer (a boundary's selection) is not a layer's. ``clock`` as
    in ``LanguageModelTimer``.

    >>> with LayerKindTimer(model) as timer:                            # doctest: +SKIP
    ...     model(**inputs)
    >>> timer.seconds                                                   # doctest: +SKIP
    {'attention': 0.11, 'linear_attention': 0.29}
    """

    def __init__(self, model, kinds: tuple[str, ...], clock: Callable[[], float] = time.perf_counter):
        self.layers = model.model.language_model.layers
        self.kinds = kinds
        self.clock = clock
        self.seconds: dict[str, float] = dict.fromkeys(dict.fromkeys(kinds), 0.0)

    def __enter__(self):
        start = {}

        def enter(module, args):
            start[module] = self.clock()

        def leave(kind):
            def hook(module, args, output):
                self.seconds[kind] += self.clock() - start.pop(module)

            return hook

        self._handles = []
        for layer, kind in zip(self.layers, self.kinds):
            self._handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave(kind))]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


class OperationClock(TorchDispatchMode):
    """A clock that counts tensor operations instead of seconds, while its context lasts: every aten
    operation that is not a view (a view launches no kernel and copies nothing). The count is the
    same on every machine and every run, where seconds are not; on a GPU each such operation is a
    kernel launch, which is what a runtime's small bookkeeping costs there. Hand ``read`` to the
    timers as their clock.

    >>> with OperationClock() as clock, LanguageModelTimer(model, clock=clock.read) as ops:  # doctest: +SKIP
    ...     model(**inputs)
    >>> ops.seconds                                                 # doctest: +SKIP
    [1180]
    """

    def __init__(self):
        super().__init__()
        self.operations = 0

    def read(self) -> int:
        return self.operations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.operations += 1
        return func(*args, **(kwargs or {}))


def forward_operations(model, inputs: dict, reducer=None) -> int:
    """The tensor operations (``OperationClock``) of one forward of ``model`` on ``inputs``
    (``logits_to_keep=1``, as a prefill), under ``reducer`` where given. The reduced forward's count
    less the unpatched one's is what duet-vlm adds, hooks and stages: a layer's own count does not
    depend on how many tokens it holds."""
    with torch.no_grad(), (reducer(model) if reducer is not None else contextlib.nullcontext()):
        with OperationClock() as clock:
            model(**inputs, logits_to_keep=1)
    return clock.read()


class PeakRSS:
    """Peak resident memory (bytes) that a block adds to this process, on Linux.

    torch allocates CPU tensors with the system allocator and caches nothing, so the resident set follows
    the live tensors (tracemalloc sees none of them), up to glibc's heap: a freed tensor below its
    (adaptive) mmap threshold may stay in the heap, so the same call's peak can differ by hundreds of
    MB between runs. For memory comparisons, pin the threshold (``MALLOC_MMAP_THRESHOLD_=1048576``
    in the environment): every tensor above 1 MB is then its own mapping, returned when freed.

    Before the block, glibc hands its free heap pages back to the OS (``malloc_trim``) and the
    kernel's high-water mark is reset to the current resident set (``/proc/self/clear_refs`` = 5);
    after it, ``VmHWM`` minus the resident set before is the peak. This measures every timed call in
    place, in the same rounds, where ``getrusage``'s max RSS cannot be reset and would need a fresh
    process (and a rebuilt model) per variant. ``peak`` is ``None`` where the reset is not allowed.

    >>> with PeakRSS() as memory:                                   # doctest: +SKIP
    ...     x = torch.ones(2**27)
    >>> memory.peak >= 2**29                                       # doctest: +SKIP
    True
    """

    peak: int | None = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    def __enter__(self):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self._before = self._status("VmRSS")
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc):
        if self._before is not None:
            self.peak = self._status("VmHWM") - self._before
