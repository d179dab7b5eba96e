"""The documentation: the README and every page of the site (docs/*.md) render current from the files
the commands wrote, the README's links lead to pages that exist, and the site builds strictly
(broken links and missing references fail it), as CI builds it with the ``docs`` extra."""

import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import figures  # noqa: E402 - docs/figures.py
import render  # noqa: E402 - docs/render.py

README = ROOT / "README.md"
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def test_every_page_is_current():
    """``python docs/render.py --check``: every generated table and figure of the README and the
    pages equals what its files give, and no prose quotes numbers its results file no longer holds."""
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "render.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def test_the_renderer_sees_the_readme_and_the_pages():
    checked = {path.relative_to(ROOT).as_posix() for path in render.pages()}
    assert "README.md" in checked
    assert {"docs/methods.md", "docs/choosing.md", "docs/benchmarks.md"} <= checked


def test_a_reading_goes_stale_with_its_file(tmp_path):
    """Prose marked as reading a results file fails the check once the file changes, until accepted."""
    (tmp_path / "numbers.json").write_text('{"a": 1}')
    page = "<!-- reading: numbers.json@000000000000 -->\nIt is 1.\n"
    assert render.stale_readings(page, tmp_path) == ["numbers.json"]
    accepted = render.accept_readings(page, tmp_path)
    assert render.stale_readings(accepted, tmp_path) == []
    (tmp_path / "numbers.json").write_text('{"a": 2}')
    assert render.stale_readings(accepted, tmp_path) == ["numbers.json"]


def test_readme_links_resolve():
    """The README's relative links (to the site's pages under docs/, and to files) lead somewhere
    that exists, so they work on GitHub as well as in the site."""
    missing = []
    for match in LINK.finditer(README.read_text()):
        target = match["target"].split("#")[0]
        if not target or re.match(r"[a-z]+:", target):
            continue
        if not (ROOT / target).exists():
            missing.append(match["target"])
    assert not missing, f"README links to missing files: {missing}"


def test_the_readme_is_a_front_page():
    """Issue #27: the README is what a newcomer reads in five minutes; the rest lives in the site."""
    lines = README.read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move the details to a page under docs/"


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    pages = [page for page in pages if not page.startswith("eval/")]  # duet-vlm eval's results.md (exclude_docs)
    absent = [page for page in pages if f": {page}" not in nav]
    assert not absent, f"pages missing from mkdocs.yml's nav: {absent}"


@pytest.mark.parametrize("name", ["figures", "griffe_doctests"])
def test_doctests_of_the_docs_tools(name):
    if name == "griffe_doctests":  # mkdocs.yml's griffe extension: needs the docs extra's griffe
        pytest.importorskip("griffe", reason='griffe comes with the docs extra (pip install -e ".[docs]")')
    module = importlib.import_module(name)
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict`` (what CI runs after ``pip install -e ".[docs]"``): a broken link, a
    missing anchor, a page left out of the navigation or an API reference that does not resolve fails."""
    missing = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if not _installed(name)]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)} missing): pip install -e \".[docs]\"")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "methods" / "index.html").exists()


def test_a_figure_takes_later_results_of_the_same_evaluation_only():
    """Methods evaluated later (``docs/eval/new_methods``) join the main figure as lines of their own;
    a method both files hold (the main table now has HiPrune) is drawn once per budget, from the
    later file (VisionSelector's own file holds its trained scorer, the main table its untrained
    one); a results file whose unreduced row differs is another evaluation and is refused."""
    import json

    main = json.loads((ROOT / "docs/eval/results.json").read_text())
    later = json.loads((ROOT / "docs/eval/new_methods/results.json").read_text())
    points, _ = figures.evaluation([main, later])
    alone, _ = figures.evaluation(main)
    assert {p.method for p in points} - {p.method for p in alone} == {"divprune+random_horizon"}
    assert sorted(p.budget for p in points if p.method == "hiprune") == [64, 128, 192]
    moved = {**later, "rows": [{**row, "accuracy": row["accuracy"] / 2, "retained_percent": None}
                               if row["method"] == "hiprune" else row for row in later["rows"]]}
    points, _ = figures.evaluation([main, moved])
    mine = {p.budget: p.retained for p in points if p.method == "hiprune"}
    theirs = {row["budget"]: 50 * row["accuracy"] / next(r["accuracy"] for r in main["rows"] if r["method"] == "full")
              for row in later["rows"] if row["method"] == "hiprune"}
    assert mine == pytest.approx(theirs)
    other = {**later, "rows": [{**row, "accuracy": 0.5} if row["method"] == "full" else row for row in later["rows"]]}
    with pytest.raises(ValueError, match="another evaluation"):
        figures.evaluation([main, other])


def test_a_method_without_a_budget_is_one_line_at_its_average_tokens():
    """PixelPrune's rows (``pixelprune:OPTIONS``, no budget) are one line named ``pixelprune``, each
    point annotated with its realised average tokens; ``full`` and the blank image are not points."""
    import json

    main = json.loads((ROOT / "docs/eval/results.json").read_text())
    pixelprune = json.loads((ROOT / "docs/eval/pixelprune/results.json").read_text())
    points, _ = figures.evaluation([main, pixelprune])
    mine = sorted((p.budget, round(p.retained, 1)) for p in points if p.method == "pixelprune")
    expected = sorted((round(row["avg_visual_tokens"]), round(row["retained_percent"], 1))
                      for row in pixelprune["rows"] if row["method"].startswith("pixelprune"))
    assert mine == expected and len(mine) == 5
    assert not any(p.method in ("full", "blank image") or ":" in p.method for p in points)


def test_the_serving_table_compares_every_route_with_vllms_own_class(tmp_path):
    """A second unreduced route (the Transformers backend) is compared with vLLM's own class, and so
    is the plugin, not with the backend that came after it."""
    import json

    def row(setting, method, rps):
        return {"setting": setting, "method": method, "budget": 64 if method else None, "visual_tokens": 64,
                "concurrency": 1, "max_tokens": 16, "requests_per_s": rps, "output_tokens_per_s": 1.0,
                "ttft_median_s": 1.0, "ttft_p90_s": 1.0, "peak_rss_gib": 1.0, "load_before": 0.0, "load_after": 0.0}

    record = {"command": "bench", "model": {"visual_tokens": 576, "layers": 32, "hidden": 512, "vision_layers": 24,
                                            "vision_hidden": 256},
              "machine": {"cpus": 2, "server_threads": 2, "vllm": "0.32.0"}, "settings": {"requests": 6, "dtype": "float32"},
              "rows": [row("vLLM, unreduced", None, 1.0), row("backend, unreduced", None, 4.0), row("plugin", "pool", 2.0)]}
    (tmp_path / "bench.json").write_text(json.dumps(record))
    table = render.render_vllm(tmp_path, "bench.json")
    assert "| backend, unreduced | 64 | 16 | 1 | 4.000 |" in table and "| 4.00x |" in table
    assert "| plugin 64 |" in table and "| 2.00x |" in table


def test_the_serving_table_says_whether_its_rows_repeated_images(tmp_path):
    """A record whose rows each had images new to the server says so, with as many requests as
    clients where it sent that many; one from before says its rows repeat images, which vLLM's
    encoder cache encodes once (rows of such records measured the cache)."""
    import json

    record = {"command": "bench", "model": {"visual_tokens": 576, "layers": 32, "hidden": 512, "vision_layers": 24,
                                            "vision_hidden": 256},
              "machine": {"cpus": 2, "server_threads": 2, "vllm": "0.32.0"},
              "settings": {"requests": 6, "dtype": "float32"}, "rows": []}
    (tmp_path / "old.json").write_text(json.dumps(record))
    record["settings"] = {"requests": "clients", "dtype": "float32", "images": "new to the server in every row"}
    (tmp_path / "new.json").write_text(json.dumps(record))
    old, new = render.render_vllm(tmp_path, "old.json"), render.render_vllm(tmp_path, "new.json")
    assert "6 image requests per row (a warm-up request before each row; rows repeat images, which vLLM's encoder " \
           "cache then encodes once)" in old
    assert "as many image requests as clients per row (a warm-up request before each row; every row and its " \
           "warm-up on images new to that server)" in new


def test_the_runtime_table_names_the_processor_each_run_recorded(tmp_path):
    """A family's line under the runtime-against-ideal table names the processors its runs recorded
    (``bench.timing.processor``), and stays as it was for runs that recorded none."""
    import json

    def run(name: str, processor: dict | None) -> str:
        results = {"family": "llava", "rounds": 4, "allocator": "glibc, freed memory kept",
                   "load_average_before_after": [[1.5, 1.0, 1.0], [2.0, 1.0, 1.0]],
                   "variants": {"duet ratio 0.11": {"lm_vs_ideal": 1.01}}}
        if processor is not None:
            results["processor"] = processor
        (tmp_path / name).write_text(json.dumps(results))
        return name

    epyc = {"model": "AMD EPYC, cpu family 25, model 1", "capability": "AVX2", "cpus": 2}
    lines = render.render_lm_vs_ideal(tmp_path, run("a.json", epyc), run("b.json", epyc)).splitlines()
    assert lines[-1] == ("LLaVA-1.5: 4 rounds per run; 1-minute load average before -> after each run: "
                         "1.50 -> 2.00; 1.50 -> 2.00; allocator: glibc, freed memory kept; "
                         "processor: AMD EPYC, cpu family 25, model 1 (AVX2).  ")
    assert lines[2].startswith("| LLaVA-1.5 | duet ratio 0.11 | 1.010 | 1.010 | 1.010 | yes |"), lines[2]
    older = render.render_lm_vs_ideal(tmp_path, run("c.json", None)).splitlines()
    assert older[-1].endswith("allocator: glibc, freed memory kept.  ")
