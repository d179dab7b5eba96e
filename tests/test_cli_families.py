"""``duet-vlm check`` and a two-image ``duet-vlm run`` through the processor of every family's written
checkpoint (issue 50, item 3): the matrix tests drive ``check_model`` with inputs built by hand and
never meet a processor.

- ``check`` passes on each family's tiny checkpoint, its inputs built by the checkpoint's processor
  (two images of different aspects, one per row); each row of the padded batch holds the tokens of
  that row alone;
- a two-image ``run`` gives each row what that image gives alone: the answers with all tokens and
  reduced, and the visual tokens per layer;
- without torchvision (this install, as the README's CPU install) the families whose processors
  build a video processor get the family's processor class without one, their images through
  transformers' PIL image processor, and a video is refused in one line that says what to install;
  ``write_gemma4`` writes its checkpoint without torchvision.

Gemma 3 (whose processor takes one list of images per row, and failed on a flat list) and Qwen3.5 (a
processor built without torchvision) run in the default suite; every other family in the ``matrix``
step.
"""

from __future__ import annotations

import importlib.util
import json
from functools import partial

import pytest
import torch
from typer.testing import CliRunner

from duet_vlm.check import TOLERANCE, prompts
from duet_vlm.check.report import NOT_APPLICABLE, PASS
from duet_vlm.cli import app
from duet_vlm.compare import ask, load_processor
from duet_vlm.tiny import checkpoints
from duet_vlm.synthetic import sample

runner = CliRunner()

WRITERS = {
    "llava": checkpoints.write_llava,
    "llava_next": checkpoints.write_llava_next,
    "llava_onevision": checkpoints.write_llava_onevision,
    "gemma3": partial(checkpoints.write_gemma3, gemma_template=True),
    "gemma4": checkpoints.write_gemma4,
    "qwen2_vl": partial(checkpoints.write_qwen_vl, kind="qwen2_vl"),
    "qwen2_5_vl": partial(checkpoints.write_qwen_vl, kind="qwen2_5_vl"),
    "qwen3_vl": partial(checkpoints.write_qwen_vl, kind="qwen3_vl"),
    "qwen3_5": partial(checkpoints.write_qwen_vl, kind="qwen3_5"),
    "qwen3_5_moe": partial(checkpoints.write_qwen_vl, kind="qwen3_5_moe"),
    "internvl": checkpoints.write_internvl,
}
DEFAULT = ("gemma3", "qwen3_5")
#: The processors transformers builds with a video processor, which needs torchvision.
WITH_VIDEO = {"llava_onevision", "gemma4", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe", "internvl"}
NO_TORCHVISION = importlib.util.find_spec("torchvision") is None
PROMPT = "What is shown in the image?"


@pytest.fixture(scope="module", params=[pytest.param(name, marks=() if name in DEFAULT else pytest.mark.matrix)
                                        for name in WRITERS])
def written_checkpoint(request, tmp_path_factory):
    """``(family, folder)``: the family's tiny checkpoint as its writer leaves it (weights, config,
    tokenizer, processor config, chat template)."""
    name = request.param
    return name, WRITERS[name](tmp_path_factory.mktemp(name))


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory):
    """A drawn scene and the same scene at 3:4, as files: rows whose images differ in size."""
    folder = tmp_path_factory.mktemp("scenes")
    scene = sample("test", 0).image
    scene.save(folder / "scene.png")
    scene.resize((scene.width * 3 // 4, scene.height)).save(folder / "narrow.png")
    return folder / "scene.png", folder / "narrow.png"


def test_check_passes_through_the_processor(written_checkpoint, two_scenes, tmp_path):
    name, folder = written_checkpoint
    processor = load_processor(str(folder))
    batch, rows = prompts(processor, [sample("test", 0).image, sample("test", 1).image], "cpu")
    for b, alone in enumerate(rows):  # each row of the padded batch is that row's prompt and image alone
        valid = batch["attention_mask"][b].bool()
        assert batch["input_ids"][b, valid].tolist() == alone["input_ids"][0].tolist(), b
    out = tmp_path / "check.json"
    result = runner.invoke(app, ["check", "--model", str(folder), "--ratio", "0.5", "--rounds", "1", "--skip", "timing",
                                 "--skip", "modes", "--image", str(two_scenes[0]), "--image", str(two_scenes[1]),
                                 "--json", str(out)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(out.read_text())
    results = {r["key"]: r for r in report["results"]}
    assert report["ok"] and report["setup"]["family"] == name
    assert results["full"]["numbers"]["bit_identical"]
    padded = results["padded"]
    assert padded["status"] == PASS and padded["numbers"]["rows"] == 2
    assert padded["numbers"]["max_difference"] <= TOLERANCE[torch.float32]
    assert results["counts"]["numbers"]["visual_per_layer"] == results["counts"]["numbers"]["planned"]
    if name == "gemma4":
        assert results["ideal"]["status"] == NOT_APPLICABLE and "per-layer inputs" in results["ideal"]["detail"]
    else:
        assert results["ideal"]["status"] == PASS and results["ideal"]["numbers"]["positions"] > 0
        assert results["ideal"]["numbers"]["max_difference"] <= results["ideal"]["numbers"]["tolerance"]


def test_run_with_two_images_gives_each_row_what_its_image_gives_alone(written_checkpoint, two_scenes):
    _, folder = written_checkpoint
    scene, narrow = two_scenes
    batch = ask(str(folder), PROMPT, scene, images=[narrow], ratio=0.5, max_new_tokens=3)
    assert [row.label for row in batch.rows] == ["row 0", "row 1"]
    for row, image in zip(batch.rows, two_scenes):
        alone = ask(str(folder), PROMPT, image, ratio=0.5, max_new_tokens=3, rounds=1)
        full, reduced = alone.answers
        assert (row.text_all_tokens, row.text) == (full.text, reduced.text), image.name
        assert row.tokens == reduced.stats.items[0].average_tokens, image.name


def test_the_gemma3_run_command_with_two_images(two_scenes, tmp_path):
    """The issue's command: two images on Gemma 3 (whose processor had read a flat list as one row's)."""
    folder = WRITERS["gemma3"](tmp_path / "gemma3")
    result = runner.invoke(app, ["run", "--model", str(folder), "--image", str(two_scenes[0]), "--image",
                                 str(two_scenes[1]), "--prompt", PROMPT, "--ratio", "0.5", "--max-new-tokens", "2"],
                           env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = [line.split() for line in result.output.splitlines() if line.startswith("row ")]
    assert [line[:3] for line in lines] == [["row", "0", "scene.png"], ["row", "1", "narrow.png"]]


@pytest.mark.skipif(not NO_TORCHVISION, reason="torchvision is installed: transformers builds the whole processor")
def test_without_torchvision_the_processor_is_the_familys_without_its_video_processor(written_checkpoint, two_scenes,
                                                                                        monkeypatch):
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.processing_auto import processor_class_from_name
    from transformers.processing_utils import ProcessorMixin

    name, folder = written_checkpoint
    processor = load_processor(str(folder))
    if name not in WITH_VIDEO:  # transformers builds these without torchvision
        assert "video_processor" not in type(processor).get_attributes()
        return
    named = ProcessorMixin.get_processor_dict(str(folder))[0]["processor_class"]
    # by name: the whole mapping imports every processor, some of which need torchvision on 5.19
    family = processor_class_from_name(named)
    assert isinstance(processor, family) and type(processor).__name__ == named
    assert processor.video_processor is None and type(processor.image_processor).__name__.endswith("Pil")
    with pytest.raises(ValueError, match="video processors need torchvision, which is not installed"):
        processor(videos=[[sample("test", 0).image] * 2], text=PROMPT)

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", never)
    if getattr(AutoConfig.from_pretrained(folder), "video_token_id", None) is None:
        return  # run refuses the video before: the checkpoint takes none (InternVL's here)
    result = runner.invoke(app, ["run", "--model", str(folder), "--video", str(two_scenes[0]), "--prompt", PROMPT])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "transformers' video processors need torchvision" in lines[0], result.stderr
    assert "install the torchvision build that matches your torch" in lines[0]


def test_a_processor_that_needs_torchvision_for_its_images_is_one_line(monkeypatch, tmp_path):
    """A processor with no video processor to leave out (LLaVA's), whose images would need torchvision:
    one line naming what is missing and what to install, before the weights load."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from duet_vlm.check import DEMO_MODEL

    if not NO_TORCHVISION:
        pytest.skip("torchvision is installed")

    def needs_torchvision(*args, **kwargs):
        raise ImportError("CLIPImageProcessor requires the Torchvision library but it was not found in your environment.")

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", needs_torchvision)
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", never)
    sample("test", 0).image.save(tmp_path / "scene.png")
    for args in (["run", "--model", str(DEMO_MODEL), "--image", str(tmp_path / "scene.png"), "--prompt", PROMPT],
                 ["check", "--model", "demo"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"Error: cannot build the processor of {DEMO_MODEL}: CLIPImageProcessor requires the "
                                   "Torchvision library but it was not found in your environment; install the "
                                   "torchvision build that matches your torch")
