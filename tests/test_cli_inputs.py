"""The command line on real-looking inputs (issue #31): a non-square photo's overlay, a video on a
family that takes none, 16-bit, transparent and CMYK images, per-row budgets alone, bench figures
within the run's noise; and ``--help`` without torch."""

import copy
import io
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import duet_vlm
import duet_vlm.compare
from duet_vlm.cli import METHOD_NAMES, app, expand_list_options, printing
from duet_vlm.cli.tables import mark_noise, round_spread, selection_cost_cell
from duet_vlm.compare import check_video, read_image, saved_or_asked, seen_box, to_rgb

runner = CliRunner()


def _run(model, *args):
    return runner.invoke(app, expand_list_options(["run", "--model", str(model), "--prompt", "what color is the circle ?",
                                                   "--max-new-tokens", "1", "--rounds", "1", *map(str, args)]))


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------- --help imports no torch
HELP = """
import contextlib, io, json, sys
{prelude}
import click, typer
import duet_vlm.cli
group = typer.main.get_command(duet_vlm.cli.app)
context = click.Context(group, info_name="duet-vlm")
with contextlib.redirect_stdout(io.StringIO()):
    group.get_help(context)
    for name, command in group.commands.items():
        if name not in ("train", "train-demo"):  # their help is argparse's, of a config dataclass, when they run
            command.get_help(click.Context(command, info_name=name, parent=context))
heavy = ("torch", "transformers", "matplotlib", "duet_vlm")
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in heavy)))
"""

# The package's own __init__ skipped: what the command line itself imports to print its help.
WITHOUT_PACKAGE_INIT = """
import importlib.util, types
package = types.ModuleType("duet_vlm")
package.__path__ = list(importlib.util.find_spec("duet_vlm").submodule_search_locations)
sys.modules["duet_vlm"] = package
"""


def _imported_by_help(prelude: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", HELP.format(prelude=prelude)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_help_of_every_command_imports_no_torch_of_its_own():
    """The command line's modules import the library only inside the commands: building the help of the
    group and of every command imports neither torch, transformers nor matplotlib, nor any module of
    duet_vlm but the command line's own."""
    imported = _imported_by_help(WITHOUT_PACKAGE_INIT)
    assert imported == ["duet_vlm", "duet_vlm.cli", "duet_vlm.cli.commands", "duet_vlm.cli.printing",
                        "duet_vlm.cli.progress", "duet_vlm.cli.tables"], imported


def test_duet_vlm_help_imports_no_torch():
    """Through the package's own (lazy) __init__, as the console script runs: no torch, no transformers."""
    imported = _imported_by_help("")
    assert "torch" not in imported and "transformers" not in imported, [m for m in imported if not m.startswith("duet")]


def test_the_package_exports_what_it_did():
    """``duet_vlm``'s lazy names: every name of ``duet_vlm.methods.__all__`` (its static copy equals it),
    the rest of the public surface, and the submodules as attributes."""
    import duet_vlm.methods

    assert list(duet_vlm._METHOD_EXPORTS) == list(duet_vlm.methods.__all__)
    for name in duet_vlm.__all__:
        assert getattr(duet_vlm, name) is not None, name
    assert duet_vlm.make is duet_vlm.methods.make and duet_vlm.compaction.__name__ == "duet_vlm.compaction"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        duet_vlm.nothing


def test_the_help_lists_every_registered_method():
    assert METHOD_NAMES == tuple(sorted(duet_vlm.METHODS)), (
        "a method was registered or removed: update METHOD_NAMES in src/duet_vlm/cli/commands.py")


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "duet_vlm.cli", "plan", "--budget", "64"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr
    assert "visual tokens per layer" in done.stdout


# ----------------------------------------------------------------------------- a. the overlay of a non-square photo
def _ramp(width: int, height: int) -> Image.Image:
    """A picture whose red channel counts columns and green channel rows (0 to 255 across it)."""
    x = np.broadcast_to(np.linspace(0, 255, width), (height, width))
    y = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


@pytest.mark.parametrize("size", [(600, 300), (300, 600), (336, 400), (500, 500)])
def test_the_box_the_model_sees_is_what_the_processor_crops(tiny_demo_model, size):
    """LLaVA-1.5's processor resizes the shortest edge to 336 and centre-crops 336x336: on a ramp
    picture, the processed image's first and last columns and rows are the box's edges."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_demo_model).image_processor
    width, height = size
    pixels = processor(images=_ramp(width, height), return_tensors="pt")["pixel_values"][0]
    mean, std = np.array(processor.image_mean)[:, None, None], np.array(processor.image_std)[:, None, None]
    seen = (pixels.numpy() * std + mean) * 255  # back to the ramp's values
    left, top, right, bottom = seen_box(processor, size)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    columns, rows = seen[0].mean(0) * (width - 1) / 255, seen[1].mean(1) * (height - 1) / 255  # in pixels of the picture
    scale = max(width, height) / 336  # a pixel of the model's square, in the picture's pixels
    assert abs(columns[0] - left) <= 1.5 * scale and abs(columns[-1] - (right - 1)) <= 1.5 * scale
    assert abs(rows[0] - top) <= 1.5 * scale and abs(rows[-1] - (bottom - 1)) <= 1.5 * scale


def test_the_overlay_draws_what_the_model_saw_where_it_saw_it(tiny_demo_model, tmp_path, monkeypatch):
    """A wide photo with red strips the centre crop leaves out: the overlay draws the patch grid on the
    crop alone (no red anywhere in what it draws), and the cells cover exactly the crop."""
    import matplotlib.axes

    photo = Image.new("RGB", (600, 300), (255, 0, 0))
    photo.paste(Image.new("RGB", (300, 300), (40, 90, 200)), (150, 0))
    photo.save(tmp_path / "wide.png")
    drawn, layers = {}, []
    draw, imshow = duet_vlm.compare.draw_overlay, matplotlib.axes.Axes.imshow

    def record_draw(image, stats, grid, path, title="", has_cls=True):
        drawn.update(image=image, grid=grid)
        return draw(image, stats, grid, path, title, has_cls)

    def record_imshow(axis, data, *args, **kwargs):
        if np.ndim(data) == 3 and np.shape(data)[-1] == 4:  # a layer of patch cells (RGBA)
            layers.append((np.asarray(data), kwargs["extent"]))
        return imshow(axis, data, *args, **kwargs)

    monkeypatch.setattr(duet_vlm.compare, "draw_overlay", record_draw)
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", record_imshow)
    result = _run(tiny_demo_model, "--image", tmp_path / "wide.png", "--overlay", tmp_path / "o.png")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (tmp_path / "o.png").stat().st_size > 10_000
    picture = np.asarray(drawn["image"])
    assert picture.shape == (300, 300, 3) and (picture == (40, 90, 200)).all()  # the crop, (150, 0, 450, 300)
    assert layers and all(extent == (0, 300, 300, 0) and data.shape[:2] == drawn["grid"] for data, extent in layers)
    assert any(data[..., 3].any() for data, _ in layers)  # cells were drawn


def test_a_processor_that_pads_to_a_square_sees_beyond_the_photo():
    from transformers import LlavaImageProcessor

    processor = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert seen_box(processor, (600, 300)) == (0, -150, 600, 450)
    part = duet_vlm.compare.seen_part(Image.new("RGB", (600, 300), (255, 0, 0)), processor)
    assert part.size == (600, 600) and part.getpixel((300, 0)) == tuple(int(255 * m) for m in processor.image_mean)
    assert part.getpixel((300, 300)) == (255, 0, 0)


# ----------------------------------------------------------------------------- b. a video on a family that takes none
def test_a_video_on_llava_1_5_is_refused_naming_the_families_that_take_one(tiny_demo_model, tmp_path):
    frames = [Image.new("RGB", (64, 48), color) for color in ("red", "blue", "green")]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    result = _run(tiny_demo_model, "--video", tmp_path / "clip.gif")
    _one_line_error(result, "--video", "LLaVA-1.5", "takes no video", "LLaVA-OneVision, Video-LLaVA and Qwen2/2.5/3-VL")


def test_only_the_families_that_take_a_video_are_given_one():
    from transformers import (
        LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig, Qwen2VLConfig, Qwen2_5_VLConfig, Qwen3VLConfig, VideoLlavaConfig,
    )

    with pytest.raises(ValueError, match="is a LLaVA-NeXT checkpoint, which takes no video"):
        check_video(LlavaNextConfig(), "llava-hf/llava-v1.6-mistral-7b-hf")
    with pytest.raises(ValueError, match="is a LLaVA-1.5 checkpoint"):
        check_video(LlavaConfig(), "llava-hf/llava-1.5-7b-hf")
    for config in (LlavaOnevisionConfig, VideoLlavaConfig, Qwen2VLConfig, Qwen2_5_VLConfig, Qwen3VLConfig):
        check_video(config(), "a checkpoint")


# ----------------------------------------------------------------------------- c. image modes
def test_a_16_bit_greyscale_png_is_scaled_to_8_bits(tiny_demo_model, tmp_path, monkeypatch):
    """Pillow reads a 16-bit PNG as mode I;16; ``convert("RGB")`` clipped every value above 255 to white."""
    ramp = np.linspace(0, 65535, 200 * 120).reshape(120, 200).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    expected = np.round(ramp / 257).astype(np.uint8)
    picture = np.asarray(read_image(tmp_path / "grey16.png"))
    assert picture.shape == (120, 200, 3) and (picture == expected[..., None]).all()
    # and what `duet-vlm run` hands the model
    given, compare = [], duet_vlm.compare.compare
    monkeypatch.setattr(duet_vlm.compare, "compare",
                        lambda model, processor, image, *args: given.append(image) or compare(model, processor, image, *args))
    result = _run(tiny_demo_model, "--image", tmp_path / "grey16.png")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (np.asarray(given[0]) == expected[..., None]).all()


def test_a_32_bit_greyscale_image_of_16_bit_values_and_the_ones_that_cannot_be_read():
    values = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32))
    assert values.mode == "I" and np.asarray(to_rgb(values))[0, :, 0].tolist() == [0, 1, 255]
    with pytest.raises(ValueError, match="deep.tif: a 32-bit integer image with values from 0 to 70000"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "deep.tif")
    with pytest.raises(ValueError, match="floating-point image"):
        to_rgb(Image.fromarray(np.zeros((2, 2), dtype=np.float32)))


def test_transparency_is_composited_over_white(tmp_path):
    """A transparent pixel shows white, not the colour hidden under it (black here); half-transparent
    blue over white is pale blue. RGBA, greyscale with alpha and a palette with a transparent entry."""
    rgba = np.zeros((10, 30, 4), dtype=np.uint8)  # transparent black
    rgba[:, 10:20] = (255, 0, 0, 255)  # opaque red
    rgba[:, 20:] = (0, 0, 255, 128)  # half-transparent blue
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    picture = np.asarray(read_image(tmp_path / "rgba.png")).astype(int)
    assert picture[0, 0].tolist() == [255, 255, 255] and picture[0, 15].tolist() == [255, 0, 0]
    assert abs(picture[0, 25] - [127, 127, 255]).max() <= 1
    Image.fromarray(np.stack([np.full((4, 4), 60, np.uint8), np.zeros((4, 4), np.uint8)], -1)).save(tmp_path / "la.png")
    assert np.asarray(read_image(tmp_path / "la.png"))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0])
    palette.save(tmp_path / "palette.png", transparency=1)
    assert np.asarray(read_image(tmp_path / "palette.png"))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("suffix", ["tif", "jpg"])
def test_a_cmyk_image_is_read_as_rgb(tmp_path, suffix):
    cmyk = Image.new("CMYK", (32, 16), (255, 0, 0, 0))  # cyan
    cmyk.paste(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (16, 0))  # red
    cmyk.save(tmp_path / f"cmyk.{suffix}")
    assert Image.open(tmp_path / f"cmyk.{suffix}").mode == "CMYK"
    picture = read_image(tmp_path / f"cmyk.{suffix}")
    tolerance = 0 if suffix == "tif" else 8
    assert picture.mode == "RGB"
    assert abs(np.asarray(picture)[8, 4].astype(int) - [0, 255, 255]).max() <= tolerance
    assert abs(np.asarray(picture)[8, 28].astype(int) - [255, 0, 0]).max() <= tolerance


# ----------------------------------------------------------------------------- d. per-row budgets alone
def test_per_row_budgets_solve_no_budget_the_user_never_gave(tiny_demo_model, tmp_path):
    """FastV cannot average 64 tokens per layer on an 8-layer model (the first 2 layers alone give 144),
    so a default of 64 made --budgets 150 200 fail; the rows' own budgets run."""
    from duet_vlm import synthetic

    for index in range(2):
        synthetic.sample("test", index).image.save(tmp_path / f"scene{index}.png")
    result = _run(tiny_demo_model, "--image", tmp_path / "scene0.png", "--image", tmp_path / "scene1.png",
                  "--method", "fastv", "--budgets", 150, 200)
    assert result.exit_code == 0, result.output + repr(result.exception)
    flat = " ".join(result.output.split())
    assert "One batch, fastv, a budget per row" in flat
    # the table only: the weights' loading bar before it prints a speed ("8710.64it/s") that may hold "64"
    table = flat[flat.index("One batch, fastv, a budget per row"):]
    assert not re.search(r"(?<![\d.])64(?!\d)", table), table


def test_saved_or_asked_makes_the_reducer_at_the_rows_own_budget():
    reducer, label = saved_or_asked("unused", "duet", None, None, budgets=[16, 40])
    assert reducer == duet_vlm.make("duet", budget=16) and label == "duet"
    reducer, label = saved_or_asked("unused", "visionzip", None, None, ratios=[0.1, 0.2])
    assert reducer == duet_vlm.make("visionzip", ratio=0.1) and label == "visionzip"
    reducer, label = saved_or_asked("unused", None, None, None)
    assert reducer == duet_vlm.make("duet", budget=64) and label == "duet 64"  # no rows: the default


# ----------------------------------------------------------------------------- e. bench figures within the noise
def _variant(cost, rounds_s, ideal="ideal: 64 x8", **extra):
    """A reduced variant's row of ``measure``: ``cost`` its selection cost, ``rounds_s`` its per-round seconds."""
    return {"avg_visual_tokens": 63.75, "visual_tokens_per_layer": [64] * 8, "forward_s": sorted(rounds_s)[len(rounds_s) // 2],
            "ideal": ideal, "forward_vs_unreduced": 0.9, "forward_vs_ideal": 1.0 + cost, "selection_cost_s": cost,
            "saving_s": 0.2, "cost_share_of_saving": cost / 0.2, "selection_flops": None, "projector_extra_flops": 0.0,
            "decoder_flops": 2e8, "pays": True, "rounds_paid": 3, "forward_rounds_s": rounds_s, **extra}


BENCH = {  # `duet-vlm bench` at its smallest settings: 3 rounds, a cost below the rounds' spread
    "rounds": 3, "load_average_before_after": [[1.9, 1.8, 1.7], [2.1, 1.9, 1.8]],
    "prefill": {
        "no reduction": {"avg_visual_tokens": 576.0, "visual_tokens_per_layer": [576] * 8, "forward_s": 1.80,
                         "decoder_flops_full": 2.9e9, "forward_rounds_s": [1.78, 1.80, 1.85]},
        "duet 64": _variant(-0.03, [1.50, 1.52, 1.58]),
        "pyramiddrop 64": _variant(0.31, [1.80, 1.82, 1.83]),
    },
    "ideals": {"ideal: 64 x8": {"visual_tokens_per_layer": [64] * 8, "forward_s": 1.53, "forward_vs_unreduced": 0.85,
                                "forward_rounds_s": [1.49, 1.53, 1.60]},
               "ideal: 576 x8": {"visual_tokens_per_layer": [576] * 8, "forward_s": 1.50, "forward_vs_unreduced": 0.833,
                                 "forward_rounds_s": [1.49, 1.50, 1.52]}},
}


def test_a_selection_cost_within_the_rounds_spread_is_said_to_be_noise():
    ideals = BENCH["ideals"]
    assert round_spread(BENCH["prefill"]["duet 64"], ideals) == pytest.approx(0.11)  # its ideal's 1.49 to 1.60
    assert selection_cost_cell(BENCH["prefill"]["duet 64"], ideals) == "within noise (spread 0.110)"
    assert selection_cost_cell(BENCH["prefill"]["pyramiddrop 64"], ideals) is None  # 0.31 > 0.11: a result
    one_round = _variant(-0.01, [1.5])
    assert selection_cost_cell(one_round, {}) == "within noise (one round)"  # no spread, and never a negative result
    assert selection_cost_cell(_variant(0.02, [1.5]), {}) is None
    assert selection_cost_cell(_variant(-0.5, [1.50, 1.51]), ideals) == "< 0: faster than its ideal"


@pytest.mark.parametrize("terminal", [False, True])
def test_bench_prints_noise_as_noise_and_keeps_the_numbers(terminal, capsys):
    """The printed table says "within noise" where the cost is noise and keeps pyramiddrop's cost; the
    results (the JSON) are untouched. A narrow terminal gets the same words in tables."""
    from duet_vlm.bench.prefill import costs_markdown

    results = copy.deepcopy(BENCH)
    console, printing.console = printing.console, Console(width=80 if terminal else 250, file=io.StringIO(), record=True,
                                                          color_system=None, force_terminal=terminal)
    try:
        printing.print_costs(results["prefill"], results)
        text = printing.console.export_text() + capsys.readouterr().out
    finally:
        printing.console = console
    assert results == BENCH
    flat = " ".join(text.split())
    assert "within noise (spread 0.110)" in flat and "-0.03" not in flat and "-0.15" not in flat
    assert "0.31" in flat and "1.55" in flat  # pyramiddrop's cost and its share of the saving
    assert "within noise: the selection cost" in flat  # the legend
    table = costs_markdown(results["prefill"], results["ideals"], 3)
    marked, any_marked = mark_noise(table, results["prefill"], results["ideals"])
    assert any_marked and marked.count("within noise") == 1
    unmarked = {"prefill": {"pyramiddrop 64": BENCH["prefill"]["pyramiddrop 64"]}, "ideals": BENCH["ideals"]}
    table = costs_markdown(unmarked["prefill"], unmarked["ideals"], 3)
    assert mark_noise(table, unmarked["prefill"], unmarked["ideals"]) == (table, False)  # nothing to say: unchanged
