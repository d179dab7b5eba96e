""""Which method and budget?": accuracy retained against cost, one line per method over its budgets,
with the Pareto front marked, drawn from the files the commands wrote. Never hand-drawn: the
README and the site embed what this writes, and ``python docs/render.py --check`` fails when a
figure no longer matches its inputs.

It reads only JSON (no import of duet_vlm), so it runs anywhere matplotlib does:

- an evaluation's ``results.json`` (``duet-vlm eval``): rows of ``method``, ``budget``,
  ``accuracy``, ``retained_percent`` and ``decoder_tflops_per_sample``; the row without a budget
  named ``full`` is the reference; rows of a method that takes no budget (``pixelprune:OPTIONS``)
  make one line of their method, each point annotated with its realised ``avg_visual_tokens``; the ``blank image`` control is drawn as the floor. More results
  files of the same evaluation (methods evaluated later, on the same questions: their ``full`` row
  must equal the first file's) add their methods' lines;
- optionally benchmark outputs of ``duet-vlm bench --generate`` (``variants`` named ``"METHOD BUDGET"``
  with ``vs_full.first_token_s``, the median per-round ratio of the time to the first token to the
  unreduced model's): the second panel places every evaluated method and budget that a benchmark
  measured at its measured latency.

Each figure carries the SHA-256 of its inputs and of this file in its PNG metadata (``duet-inputs``),
and the generated block that embeds it repeats that digest, so both go stale together.

    python docs/figures.py OUT.png RESULTS.json [MORE_RESULTS.json ...] [BENCH.json ...]   # one figure (render.py does this)

>>> pareto_front([(0.1, 90.0), (0.2, 95.0), (0.3, 94.0), (0.05, 60.0)])
[(0.05, 60.0), (0.1, 90.0), (0.2, 95.0)]
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

METADATA_KEY = "duet-inputs"


@dataclass(frozen=True)
class Point:
    method: str  # the line it belongs to (a content-adaptive row: "METHOD (SIGNAL)")
    budget: int
    cost: float  # share of the reference's cost (1.0 = the unreduced model)
    retained: float  # % of the reference's accuracy


def digest(inputs: list[Path]) -> str:
    """SHA-256 over this file's source and the inputs' bytes (in order, with their names)."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for path in inputs:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def recorded_digest(png: Path) -> str | None:
    """The digest a figure was drawn from (its PNG metadata), or None for a missing or foreign file."""
    if not png.exists():
        return None
    from PIL import Image

    with Image.open(png) as image:
        return getattr(image, "text", {}).get(METADATA_KEY)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both (lower cost, higher retained), by cost."""
    front = [p for p in points if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points)]
    return sorted(set(front))


def _label(row: dict) -> str:
    return row["method"] + (f" ({row['adaptive']})" if row.get("adaptive") else "")


def is_evaluation(data) -> bool:
    """A ``duet-vlm eval`` results file (rows), not a benchmark's output."""
    return isinstance(data, dict) and "rows" in data and "benchmark" not in data


def evaluation(results: dict | list[dict]) -> tuple[list[Point], dict]:
    """The reduced rows of one evaluation, or of several files of the same one, as points (cost =
    decoder prefill FLOPs / the full row's), and what the figure says about the run (the first
    file's command, split, questions, the blank-image floor). A row of a method, option and budget
    that a later file has too is the later file's (the files go from the whole table to runs of one
    method with its own files: VisionSelector's trained scorer)."""
    files = results if isinstance(results, list) else [results]
    rows = files[0]["rows"]
    full = next(r for r in rows if r["method"] == "full" and r["budget"] is None)
    for other in files[1:]:
        theirs = next((r for r in other["rows"] if r["method"] == "full" and r["budget"] is None), None)
        if theirs is None or (theirs["accuracy"], theirs["decoder_tflops_per_sample"]) != (
                full["accuracy"], full["decoder_tflops_per_sample"]):
            raise ValueError(f"{other.get('meta', {}).get('command')!r} is another evaluation: its full row differs")
        rows = rows + other["rows"]
    latest = {}
    for row in rows:
        latest[(row["method"], row["budget"], row.get("adaptive"), row.get("positions"))] = row
    rows = list(latest.values())
    points = []
    for row in rows:
        if row["method"] in ("full", "blank image") or not row.get("decoder_tflops_per_sample"):
            continue
        label, budget = _label(row), row["budget"]
        if budget is None:  # a method without a budget (PixelPrune): one point per option, at its realised count
            if row.get("avg_visual_tokens") is None:
                continue
            label, budget = label.split(":")[0], round(row["avg_visual_tokens"])
        retained = row.get("retained_percent")
        if retained is None:
            retained = 100 * row["accuracy"] / full["accuracy"]
        points.append(Point(label, int(budget), row["decoder_tflops_per_sample"] / full["decoder_tflops_per_sample"],
                            retained))
    blank = next((r for r in rows if r["method"] == "blank image"), None)
    meta = dict(files[0].get("meta", {}))
    meta["floor"] = None if blank is None else blank.get("retained_percent", 100 * blank["accuracy"] / full["accuracy"])
    meta["full_accuracy"] = full["accuracy"]
    return points, meta


def latencies(benches: list[dict]) -> dict[tuple[str, int], float]:
    """``(method, budget) -> time to the first token / the unreduced model's`` from ``bench --generate``
    outputs (the first file that measured a variant wins; ideals are left out)."""
    found: dict[tuple[str, int], float] = {}
    for runs in benches:
        for run in runs if isinstance(runs, list) else [runs]:
            if run.get("benchmark") != "generate":
                continue
            for name, variant in run["variants"].items():
                parts = name.split()
                if len(parts) == 2 and parts[1].isdigit():
                    found.setdefault((parts[0], int(parts[1])), variant["vs_full"]["first_token_s"])
    return found


def percent_tick(value: float, _position=None) -> str:
    """A share as a tick label: ``0.25 -> '25%'``."""
    return f"{100 * value:.3g}%"


def minor_tick(value: float, _position=None) -> str:
    """Minor ticks of a log axis labelled at 2, 3 and 5 of each decade only.

    >>> [minor_tick(v) for v in (0.2, 0.4, 0.5)]
    ['20%', '', '50%']
    """
    return percent_tick(value) if round(value / 10 ** math.floor(math.log10(value)), 6) in (2, 3, 5) else ""


def _axes(ax, points: list[Point], colours: dict[str, tuple], xlabel: str, formats: dict[str, str]) -> None:
    by_method: dict[str, list[Point]] = {}
    for point in points:
        by_method.setdefault(point.method, []).append(point)
    for method, line in by_method.items():
        line.sort(key=lambda p: p.cost)
        ax.plot([p.cost for p in line], [p.retained for p in line], formats[method], color=colours[method], ms=4, lw=1.3,
                label=method)
        for p in line:
            ax.annotate(str(p.budget), (p.cost, p.retained), textcoords="offset points", xytext=(3, 3), fontsize=6,
                        color=colours[method])
    ax.plot([1.0], [100.0], "*", color="black", ms=10, label="full (all tokens)")
    front = pareto_front([(p.cost, p.retained) for p in points] + [(1.0, 100.0)])
    xs, ys = [], []
    for cost, retained in front:  # a step line: best retained so far as the cost grows
        if xs:
            xs.append(cost)
            ys.append(ys[-1])
        xs.append(cost)
        ys.append(retained)
    ax.plot(xs, ys, "--", color="black", lw=1, alpha=0.6)
    ax.scatter([c for c, _ in front], [r for _, r in front], s=90, facecolors="none", edgecolors="black", lw=1.2,
               label="Pareto front", zorder=5)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(percent_tick)
    ax.xaxis.set_minor_formatter(minor_tick)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy retained (% of all tokens)")
    ax.grid(True, which="both", alpha=0.25)


def draw(out: Path, results_path: Path | list[Path], bench_paths: list[Path]) -> Path:
    """Write the figure for one evaluation, from one results file or several of the same evaluation
    (and the latency panel when benchmarks measured some of its rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results_paths = results_path if isinstance(results_path, list) else [results_path]
    points, meta = evaluation([json.loads(p.read_text()) for p in results_paths])
    timed = latencies([json.loads(p.read_text()) for p in bench_paths])
    measured = [Point(p.method, p.budget, timed[(p.method, p.budget)], p.retained) for p in points
                if (p.method, p.budget) in timed]
    methods = list(dict.fromkeys(p.method for p in points))
    cmap = plt.get_cmap("tab20")
    colours = {m: cmap(i % 20) for i, m in enumerate(methods)}
    # past the palette's 20 colours, a colour comes round again: those lines are dashed, with squares
    formats = {m: "-o" if i < 20 else "--s" for i, m in enumerate(methods)}
    panels = 2 if measured else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.8), squeeze=False)
    _axes(axes[0][0], points, colours, "decoder prefill FLOPs (share of all tokens, log scale)", formats)
    axes[0][0].set_title("against decoder FLOPs (exact)", fontsize=10)
    if measured:
        _axes(axes[0][1], measured, colours, "time to first token (share of all tokens, log scale)", formats)
        axes[0][1].set_title("against measured latency (where benchmarked)", fontsize=10)
    low = math.floor(min(p.retained for p in points) / 5) * 5 - 2
    floor = meta["floor"]
    if floor is not None and floor >= low - 10:  # the blank-image floor, when it is near the data
        low = min(low, math.floor(floor / 5) * 5 - 2)
    for row in axes:
        for ax in row:
            ax.set_ylim(max(0.0, low), 103)
            if floor is not None and floor >= low:
                ax.axhline(floor, color="grey", ls=":", lw=1)
                ax.text(0.01, floor, " image blanked", transform=ax.get_yaxis_transform(), fontsize=7, color="grey",
                        va="bottom")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    split, n = meta.get("split", "?"), meta.get("n", "?")
    positions = f", positions {meta['positions']}" if meta.get("positions") else ""  # a run that forced a mode
    # two lines: a one-panel figure is too narrow for the whole title on one
    fig.suptitle(f"Which method and budget? {meta.get('model', 'model')}\n{split} split{positions}, {n} questions per point "
                 f"(all tokens: {100 * meta['full_accuracy']:.1f}%)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.84 if panels == 2 else 0.78, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, metadata={METADATA_KEY: digest([*results_paths, *bench_paths])})
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(__doc__.split("\n\n")[-2].strip(), file=sys.stderr)
        return 2
    out, *inputs = map(Path, args)
    evaluations = [p for p in inputs if is_evaluation(json.loads(p.read_text()))]
    print(f"wrote {draw(out, evaluations, [p for p in inputs if p not in evaluations])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
