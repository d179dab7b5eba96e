"""Every registered method on the other families' geometries: Video-LLaVA (an image tower and a
video tower sharing one projector, an image and a video in one prompt) and LLaVA with a SigLIP
tower (no CLS token).

Tiny models of the real transformers classes. Checks: the tokens each decoder layer receives equal
the per-item stats; the KV cache per layer; a padded batch whose rows hold different items equals
each row run alone (logits and greedy tokens); no-op parity; eager equals SDPA; a training forward
and backward; the reference's video setting from ``Duet(budget=960)``; a tower no adapter knows is
refused at attach; bad ratios are refused.
"""

import pytest
import torch
from transformers import SiglipVisionConfig

import duet_vlm
from duet_vlm.adapters import Geometry
from duet_vlm.compat import VIDEO_LLAVA_IMAGES

# The tiny models and their prompts live in tests/models.py.
from models import (
    BUDGETED,
    FRAMES,
    IMAGE,
    NEXT_SIZES,
    OV_VIDEO,
    SIDE,
    VIDEO,
    batch_row,
    make_llava_next,
    make_llava_onevision,
    make_video_llava,
    mixed_batch,
    next_batch,
    ov_batch,
)
from models import llava_with as _llava_with
from checks import generate_and_check_counts, hook_ids

NAMES = BUDGETED  # pixelprune takes no budget: tests/test_pixelprune.py


@pytest.fixture(scope="module")
def video_llava():
    model = make_video_llava()
    with torch.no_grad():  # transformers adds its output-capturing hooks at the first forward
        model(**batch_row(mixed_batch(), 0))
    return model


@pytest.mark.parametrize("name", NAMES)
def test_image_and_video_in_one_prompt(video_llava, name):
    items = generate_and_check_counts(video_llava, name, batch_row(mixed_batch(), 0))
    assert [(i.modality, i.tokens, i.units) for i in items] == [("image", 64, 1), ("video", 260, FRAMES)]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "full"])
def test_mixed_batch_equals_rows_alone(video_llava, name):
    """Rows with different items reduce to different lengths; each equals the row run alone."""
    inputs = mixed_batch(seed=1)
    reducer = duet_vlm.make(name, ratio=0.5)
    kwargs = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad(), reducer(video_llava):
        logits = video_llava(**inputs).logits[:, -1]
        tokens = video_llava.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
        for b in range(2):
            alone = batch_row(inputs, b)
            torch.testing.assert_close(logits[b], video_llava(**alone).logits[0, -1], atol=1e-4, rtol=1e-4)
            single = video_llava.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :]
            assert tokens[b, : len(single)].tolist() == single.tolist(), f"row {b}"


def test_full_is_bit_identical_on_video_llava(video_llava):
    inputs = mixed_batch(seed=2)
    with torch.no_grad():
        plain = video_llava(**inputs).logits
        with duet_vlm.make("full")(video_llava):
            reduced = video_llava(**inputs).logits
    assert torch.equal(plain, reduced)


@pytest.mark.parametrize("name", ["duet", "fastv", "sparsevlm"])
def test_eager_equals_sdpa_on_video_llava(name):
    inputs = mixed_batch(seed=3)
    outputs = []
    for attn in ("sdpa", "eager"):
        model = make_video_llava(attn=attn)
        with torch.no_grad(), duet_vlm.make(name, ratio=0.5)(model):
            outputs.append(model(**inputs).logits)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(outputs[0][valid], outputs[1][valid], atol=1e-4, rtol=1e-4)


def test_training_forward_and_backward_on_video_llava(video_llava):
    inputs = mixed_batch(seed=4)
    ids = inputs["input_ids"]
    labels = ids.masked_fill((ids == IMAGE) | (ids == VIDEO) | (inputs["attention_mask"] == 0), -100)
    parameters = {
        "projector": video_llava.model.multi_modal_projector.linear_1.weight,
        "last layer": video_llava.model.language_model.layers[-1].mlp.down_proj.weight,
    }
    video_llava.zero_grad(set_to_none=True)
    try:
        with duet_vlm.make("duet", ratio=0.5)(video_llava):
            loss = video_llava(**inputs, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        for part, parameter in parameters.items():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, part
    finally:
        video_llava.zero_grad(set_to_none=True)


class _KeepEveryToken(duet_vlm.VisionStage):
    """A vision stage that records its input and keeps every token a unit's slots hold, in order
    (the last ``keep``: an image's slots skip CLS under the "default" strategy, a frame's do not)."""

    def __init__(self, seen: dict):
        self.seen = seen

    def reduce(self, view, keep):
        units, tokens = view.features.shape[:2]
        self.seen[units] = view.features
        kept = torch.arange(tokens - keep, tokens).expand(units, -1)
        return duet_vlm.VisionReduction(view.features[:, tokens - keep :], kept)


class _KeepEverything(duet_vlm.Reducer):
    """A reducer whose vision stage runs on every item but keeps all of its tokens."""

    def __init__(self):
        self.seen = {}

    def plan(self, geometry):
        schedule = duet_vlm.Schedule(geometry.num_layers, geometry.visual_tokens, geometry.visual_tokens)
        return duet_vlm.Plan(schedule, vision=_KeepEveryToken(self.seen))


def test_vision_stages_read_each_towers_feature_layer_on_video_llava(video_llava):
    """Video-LLaVA, an image and a video in one prompt, under a vision stage that runs but keeps every
    token: the features it gets are ``hidden_states[vision_feature_layer]`` of the image tower and of
    the video tower (computed here from the towers), and the logits at every position equal the
    unpatched model's. Catches a tower's feature layer taken off by one (its own projection of the
    wrong layer's output then replaces the model's)."""
    inputs = batch_row(mixed_batch(seed=7), 0)
    layer = video_llava.config.vision_feature_layer
    reducer = _KeepEverything()
    with torch.no_grad():
        plain = video_llava(**inputs).logits
        with reducer(video_llava):
            reduced = video_llava(**inputs).logits
        image = video_llava.model.image_tower(inputs[VIDEO_LLAVA_IMAGES], output_hidden_states=True).hidden_states[layer]
        video = video_llava.model.video_tower(inputs["pixel_values_videos"].flatten(0, 1), output_hidden_states=True)
    assert sorted(reducer.seen) == [1, FRAMES]  # the stage ran on the image and on the video
    torch.testing.assert_close(reducer.seen[1], image, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(reducer.seen[FRAMES], video.hidden_states[layer], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(reduced, plain, atol=1e-5, rtol=1e-5)


def test_reference_video_setting_from_the_budget():
    """The reference's Video-LLaVA run: 160 + 32 tokens per frame (CLS included), boundaries after
    layers 16 and 24 with ratios 0.5 and 0.0, 960 average of 8 x 257 tokens."""
    geometry = Geometry(32, 8 * 257, (16, 16), True, units=8, modality="video")
    plan = duet_vlm.Duet(budget=960).resolve(geometry)
    assert plan.schedule.llm_input == 1536
    assert plan.schedule.boundaries == ((16, 768), (24, 0))
    assert plan.schedule.average == 960
    assert plan.vision.contextual == 32  # so 192 - 32 = 160 dominant per frame


def test_reference_video_setting_through_the_runtime():
    model = make_video_llava(side=16, layers=32)
    ids = torch.tensor([[1, 5, 6] + [VIDEO] * 8 * 257 + [7, 8, 9]])
    inputs = {"input_ids": ids, "pixel_values_videos": torch.randn(1, 8, 3, 224, 224)}
    reducer = duet_vlm.Duet(budget=960)
    with torch.no_grad(), reducer(model):
        model(**inputs)
    (video,) = reducer.stats.items
    assert video.tokens_per_layer == [1536] * 16 + [768] * 8 + [0] * 8
    assert tuple(video.vision_kept.shape) == (8, 192)
    assert tuple(reducer.stats.vision_roles["dominant"].shape) == (8, 160)
    assert tuple(reducer.stats.vision_roles["anchors"].shape) == (8, 32)


def test_explicit_stage_a_counts_are_per_frame_of_a_video(video_llava):
    """``Duet(dominant=d, contextual=c, layers=())`` on a Video-LLaVA video keeps ``d + c`` tokens in
    every frame: ``d`` dominant (CLS and the ``d - 1`` patches the frame's CLS attends to most in the
    video tower's feature layer, from the tower's own eager attention maps here) and ``c`` merged.
    Catches explicit counts applied per video instead of per frame (``d + c`` spread over the frames).
    """
    import copy

    dominant, contextual = 10, 3
    inputs = batch_row(mixed_batch(seed=8), 1)  # a video only
    reducer = duet_vlm.Duet(dominant=dominant, contextual=contextual, layers=())
    with torch.no_grad(), reducer(video_llava):
        video_llava(**inputs)
    (video,) = reducer.stats.items
    assert video.tokens_per_layer == [FRAMES * (dominant + contextual)] * 16
    assert video.entry_units.bincount().tolist() == [dominant + contextual] * FRAMES
    assert tuple(reducer.stats.vision_roles["anchors"].shape) == (FRAMES, contextual)
    tower = copy.deepcopy(video_llava.model.video_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(inputs["pixel_values_videos"].flatten(0, 1), output_attentions=True, output_hidden_states=True)
    layers = len(out.attentions)
    feature_layer = video_llava.config.vision_feature_layer % (layers + 1) - 1  # hidden_states[k]: layer k - 1
    cls_attention = out.attentions[feature_layer][:, :, 0, 1:].sum(dim=1)  # (frames, patches)
    for frame in range(FRAMES):
        top = (cls_attention[frame].topk(dominant - 1).indices + 1).sort().values.tolist()
        assert reducer.stats.vision_roles["dominant"][frame].tolist() == [0] + top, f"frame {frame}"


@pytest.mark.parametrize(
    "build",
    [lambda b: duet_vlm.make("duet", budget=b), lambda b: duet_vlm.make("pio", budget=b),
     lambda b: duet_vlm.Compose(duet_vlm.VisionZip(), duet_vlm.FastV(), budget=b)],
    ids=["duet", "pio", "visionzip+fastv"],
)
def test_a_video_budget_is_met_in_whole_frames(video_llava, build):
    """Methods that solve their LLM-input count for a budget, on a 4-frame video: for every budget
    they can reach, the count is a multiple of the frame count (a vision stage keeps the same count in
    every frame) and the layer average within a frame count of the budget; through the runtime the
    video enters the language model with that count, the same in every frame.
    Catches the solver trying counts that are not whole frames (the runtime then keeps fewer tokens
    per frame than the schedule it reports was planned for)."""
    geometry = duet_vlm.adapter_for(video_llava).video_geometry(FRAMES)
    reached = 0
    for budget in range(10, geometry.visual_tokens, 7):
        try:
            plan = build(budget).resolve(geometry)
        except ValueError:  # beyond what this schedule shape can average
            continue
        reached += 1
        assert plan.schedule.llm_input % FRAMES == 0, budget
        assert abs(plan.schedule.average - budget) <= FRAMES, budget
    assert reached >= 10
    reducer = build(37)  # reachable for the image geometry too (checked at attach)
    with torch.no_grad(), reducer(video_llava):
        video_llava(**batch_row(mixed_batch(seed=9), 1))
    (video,) = reducer.stats.items
    llm_input = reducer.resolve(geometry).schedule.llm_input
    assert video.tokens_per_layer[0] == llm_input
    assert video.entry_units.bincount().tolist() == [llm_input // FRAMES] * FRAMES


def test_llava_with_a_siglip_tower_ranks_patches_without_a_cls_token():
    siglip = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=112, patch_size=14)
    model = _llava_with(siglip)
    ids = torch.tensor([[1, 5] + [IMAGE] * 64 + [7, 8, 9]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 112, 112)}
    reducer = duet_vlm.Duet(budget=16)
    with torch.no_grad(), reducer(model):
        logits = model(**inputs).logits
        # The tokens kept are patches chosen by the attention they receive, not a CLS at index 0.
        dominant = reducer.stats.vision_roles["dominant"][0]
    assert torch.isfinite(logits).all()
    assert len(dominant) == reducer.stats.llm_input_tokens - reducer.stats.vision_roles["anchors"].shape[-1]
    assert duet_vlm.adapter_for(model).geometry.has_cls is False


def test_a_tower_no_adapter_knows_is_refused_at_attach():
    from transformers import PixtralVisionConfig

    pixtral = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=112, patch_size=14, head_dim=8)
    model = _llava_with(pixtral)
    with pytest.raises(TypeError, match="vision towers of type clip_vision_model, siglip_vision_model; this model's is 'pixtral'"):
        duet_vlm.Duet(budget=16).attach(model)
    assert hook_ids(model) == {}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=0.0), "ratio must lie in"),
        (dict(ratio=1.5), "ratio must lie in"),
        (dict(ratio=0.5, budget=64), "a budget or a ratio, not both"),
        (dict(budget=0), "budget must be a positive int"),
    ],
)
def test_bad_budgets_and_ratios_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        duet_vlm.make("duet", **kwargs)


def test_hooks_are_removed_after_an_exception(video_llava):
    hooks = hook_ids(video_llava)
    with pytest.raises(RuntimeError, match="boom"):
        with duet_vlm.make("duet", ratio=0.5)(video_llava):
            raise RuntimeError("boom")
    assert hook_ids(video_llava) == hooks


# ----------------------------------------------------------------------------- LLaVA-NeXT (anyres)
@pytest.fixture(scope="module")
def llava_next():
    model = make_llava_next()
    with torch.no_grad():
        model(**next_batch([[(112, 112)]]))
    return model


def test_anyres_layout_equals_the_models_packing(llava_next):
    """The slot counts the runtime finds equal what transformers' packing produces."""
    inputs = next_batch([list(NEXT_SIZES)])
    with torch.no_grad():
        features = llava_next.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert [f.shape[0] for f in features] == list(NEXT_SIZES.values())
    reducer = duet_vlm.make("duet", ratio=0.5)
    with torch.no_grad(), reducer(llava_next):
        llava_next(**inputs)
    assert [item.tokens for item in reducer.stats.items] == list(NEXT_SIZES.values())


@pytest.mark.parametrize("name", NAMES)
def test_anyres_images_of_different_sizes(llava_next, name):
    items = generate_and_check_counts(llava_next, name, next_batch([[(112, 112), (56, 112)]], seed=1))
    assert [i.tokens for i in items] == [88, 52]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "full"])
def test_anyres_padded_batch_equals_rows_alone(llava_next, name):
    """Rows holding images of different sizes and counts reduce to different lengths."""
    inputs = next_batch([[(112, 112)], [(56, 112), (100, 60)]], seed=2, suffixes=[7, 3])
    reducer = duet_vlm.make(name, ratio=0.5)
    kwargs = dict(max_new_tokens=3, do_sample=False)
    images = [1, 2]
    with torch.no_grad(), reducer(llava_next):
        logits = llava_next(**inputs).logits[:, -1]
        tokens = llava_next.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
        for b in range(2):
            keep = inputs["attention_mask"][b].bool()
            first = sum(images[:b])
            alone = {
                "input_ids": inputs["input_ids"][b : b + 1, keep],
                "attention_mask": inputs["attention_mask"][b : b + 1, keep],
                "pixel_values": inputs["pixel_values"][first : first + images[b]],
                "image_sizes": inputs["image_sizes"][first : first + images[b]],
            }
            torch.testing.assert_close(logits[b], llava_next(**alone).logits[0, -1], atol=1e-4, rtol=1e-4)
            single = llava_next.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :]
            assert tokens[b, : len(single)].tolist() == single.tolist(), f"row {b}"


def test_full_is_bit_identical_on_llava_next(llava_next):
    inputs = next_batch([[(112, 112)], [(56, 112)]], seed=3)
    with torch.no_grad():
        plain = llava_next(**inputs).logits
        with duet_vlm.make("full")(llava_next):
            reduced = llava_next(**inputs).logits
    assert torch.equal(plain, reduced)


@pytest.mark.parametrize("name", ["duet", "visionzip", "pio"])
def test_sampling_several_sequences_equals_repeated_rows(llava_next, name):
    """generate() encodes an image once and repeats the rows (num_return_sequences); the copies
    must be reduced exactly like explicitly repeated rows."""
    inputs = next_batch([[(112, 112)]], seed=4)
    repeated = {k: v.repeat_interleave(3, dim=0) for k, v in inputs.items()}
    kwargs = dict(max_new_tokens=4, do_sample=True, top_k=0)
    with torch.no_grad(), duet_vlm.make(name, ratio=0.5)(llava_next):
        torch.manual_seed(0)
        several = llava_next.generate(**inputs, num_return_sequences=3, **kwargs)
        torch.manual_seed(0)
        explicit = llava_next.generate(**repeated, **kwargs)
    assert torch.equal(several, explicit)


@pytest.mark.parametrize("name", ["duet", "random"])
def test_several_sequences_with_an_image_and_a_video_per_row(video_llava, name):
    """Repeated rows holding two items each (one per tower) read their own original's captures."""
    inputs = batch_row(mixed_batch(seed=5), 0)
    repeated = {k: v.repeat_interleave(2, dim=0) for k, v in inputs.items()}
    kwargs = dict(max_new_tokens=3, do_sample=True, top_k=0)
    with torch.no_grad(), duet_vlm.make(name, ratio=0.5)(video_llava):
        torch.manual_seed(0)
        several = video_llava.generate(**inputs, num_return_sequences=2, **kwargs)
        torch.manual_seed(0)
        explicit = video_llava.generate(**repeated, **kwargs)
    assert torch.equal(several, explicit)


# ----------------------------------------------------------------------------- LLaVA-OneVision
@pytest.fixture(scope="module")
def llava_onevision():
    model = make_llava_onevision()
    with torch.no_grad():
        model(**ov_batch([[("image", (64, 64))]]))
    return model


@pytest.mark.parametrize("name", NAMES)
def test_onevision_images_and_a_video(llava_onevision, name):
    inputs = ov_batch([[("image", (64, 64)), ("image", (32, 64)), ("video", None)]], seed=1)
    items = generate_and_check_counts(llava_onevision, name, inputs)
    assert [(i.modality, i.tokens) for i in items] == [("image", 336), ("image", 200), ("video", OV_VIDEO)]


@pytest.mark.parametrize("name", ["duet", "visionzip", "fastv", "sparsevlm", "pio", "pool"])
def test_onevision_padded_batch_equals_rows_alone(llava_onevision, name):
    rows = [[("image", (64, 64))], [("video", None), ("image", (32, 64))]]
    inputs = ov_batch(rows, seed=2)
    reducer = duet_vlm.make(name, ratio=0.5)
    with torch.no_grad(), reducer(llava_onevision):
        logits = llava_onevision(**inputs).logits[:, -1]
        images = 0
        for b, row in enumerate(rows):
            alone = {}
            keep = inputs["attention_mask"][b].bool()
            alone["input_ids"] = inputs["input_ids"][b : b + 1, keep]
            alone["attention_mask"] = inputs["attention_mask"][b : b + 1, keep]
            count = sum(kind == "image" for kind, _ in row)
            alone["pixel_values"] = inputs["pixel_values"][images : images + count]
            alone["image_sizes"] = inputs["image_sizes"][images : images + count]
            images += count
            if any(kind == "video" for kind, _ in row):
                alone["pixel_values_videos"] = inputs["pixel_values_videos"][:1]
            torch.testing.assert_close(logits[b], llava_onevision(**alone).logits[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["visionzip", "duet"])
def test_onevision_two_videos_in_one_forward_equal_each_alone(llava_onevision, name):
    """Two rows, each with its own video, in one forward: each row's logits at every position equal
    the row run alone with its own video (and the two rows' kept features differ), under a
    vision-side method and DUET. The videos share one bucket of the vision stage, so a bucket that
    reads every video's frames from the first video's captured rows would give row 1 row 0's video.
    """
    inputs = ov_batch([[("video", None)], [("video", None)]], seed=6)
    inputs["input_ids"][1] = inputs["input_ids"][0]  # the same prompt: the rows differ by their videos only
    reducer = duet_vlm.make(name, ratio=0.5)
    with torch.no_grad(), reducer(llava_onevision):
        logits = llava_onevision(**inputs).logits
        alone = []
        for b in range(2):
            single = {"input_ids": inputs["input_ids"][b : b + 1], "attention_mask": inputs["attention_mask"][b : b + 1],
                      "pixel_values_videos": inputs["pixel_values_videos"][b : b + 1]}
            alone.append(llava_onevision(**single).logits[0])
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # each video reaches its row's output
    for b in range(2):
        torch.testing.assert_close(logits[b], alone[b], atol=1e-4, rtol=1e-4, msg=f"row {b}")


def test_full_is_bit_identical_on_onevision(llava_onevision):
    inputs = ov_batch([[("image", (64, 64)), ("video", None)], [("image", (32, 64))]], seed=3)
    with torch.no_grad():
        plain = llava_onevision(**inputs).logits
        with duet_vlm.make("full")(llava_onevision):
            reduced = llava_onevision(**inputs).logits
    assert torch.equal(plain, reduced)


def test_stats_name_the_frames_and_tiles_tokens_come_from(video_llava, llava_next):
    with torch.no_grad():
        reducer = duet_vlm.make("duet", ratio=0.5)
        with reducer(video_llava):
            video_llava(**batch_row(mixed_batch(), 0))
        image, video = reducer.stats.items
        assert image.entry_units.unique().tolist() == [0]
        # Per-frame Stage A: the same number of tokens from every frame, in frame order.
        assert video.entry_units.tolist() == sorted(video.entry_units.tolist())
        assert video.entry_units.bincount().tolist() == [video.tokens_per_layer[0] // FRAMES] * FRAMES

        reducer = duet_vlm.make("fastv", ratio=0.5)
        with reducer(llava_next):
            llava_next(**next_batch([[(112, 112)]]))
        (item,) = reducer.stats.items
        units = item.entry_units  # all 88 slots enter: base tile (16), 4 tiles (16 each), 8 newlines
        assert units[units >= 0].bincount().tolist() == [16] * 5 and int((units == -1).sum()) == 8
        reached = units[item.kept_ids]
        assert len(reached) == item.tokens_per_layer[-1]


def test_overlay_draws_the_tiles_and_frames_tokens_came_from(video_llava, llava_next, tmp_path):
    """Every kept token of an anyres image or a video lands on one cell of one grid of the picture."""
    from PIL import Image

    from duet_vlm.compare import read_frames
    from duet_vlm.compare import draw_item_overlay

    with torch.no_grad():
        reducer = duet_vlm.make("duet", ratio=0.3)
        with reducer(llava_next):
            llava_next(**next_batch([[(112, 112)]]))
        (image,) = reducer.stats.items
        reducer = duet_vlm.make("duet", ratio=0.3)
        with reducer(video_llava):
            video_llava(**batch_row(mixed_batch(), 0))
        video = reducer.stats.items[1]
    assert [name for name, _, _ in image.views] == ["base tile", "high resolution"]
    assert image.views[1][1:] == (8, 8)  # 112 x 112 px: 2 x 2 tiles of 4 x 4 patches, no padding to remove
    cells = image.cells[image.entry_slots]
    assert (cells[:, 0] >= 0).all()  # Stage A keeps patches, never newlines
    assert [name for name, _, _ in video.views] == [f"frame {u}" for u in range(FRAMES)]
    drawn = video.cells[video.entry_slots]
    drawn = drawn[drawn[:, 0] >= 0]  # each frame's CLS token sits in a slot but on no cell
    assert drawn[:, 0].bincount().tolist() == [video.tokens_per_layer[0] // FRAMES - 1] * FRAMES

    frames = tmp_path / "frames"
    frames.mkdir()
    for u in range(FRAMES):
        Image.new("RGB", (112, 112), (60 * u, 90, 120)).save(frames / f"{u:02d}.png")
    pictures = read_frames(frames)
    assert len(pictures) == FRAMES
    assert draw_item_overlay(pictures, video, tmp_path / "video.png").stat().st_size > 0
    assert draw_item_overlay(pictures[0], image, tmp_path / "image.png").stat().st_size > 0


def test_a_video_with_no_frames_and_a_video_without_pixels_get_clear_errors(video_llava):
    with torch.no_grad(), duet_vlm.make("duet", ratio=0.5)(video_llava):
        with pytest.raises(ValueError, match="a video with no frames"):
            video_llava(input_ids=torch.tensor([[1, 5, 6, 7]]), pixel_values_videos=torch.randn(1, 0, 3, 112, 112))
        with pytest.raises(RuntimeError, match="video features were not computed under this reducer"):
            video_llava(input_ids=torch.tensor([[1, 5] + [VIDEO] * FRAMES * (SIDE * SIDE + 1) + [7]]))


def test_a_family_no_adapter_knows_is_named_at_attach():
    """A whole vision-language model of another family: the error names it and the supported
    classes (not the advice for wrappers or pieces of a supported model)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=14),
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=8, vocab_size=99),
        image_token_id=3,
    )
    with pytest.raises(TypeError, match=r"does not support PaliGemmaForConditionalGeneration \(model_type 'paligemma'\).*Qwen2_5_VLForConditionalGeneration"):
        duet_vlm.make("duet", budget=8).attach(PaliGemmaForConditionalGeneration(config))


def test_a_vision_budget_below_one_token_per_frame_is_a_clear_error():
    """A vision stage keeps the same count in every frame: fewer tokens than frames is refused with
    what to do, not a reshape error deep in the runtime."""
    video = Geometry(16, FRAMES * (SIDE * SIDE + 1), (SIDE, SIDE), True, units=FRAMES, modality="video")
    for name in ("random", "visionzip"):  # they keep the budget itself
        with pytest.raises(ValueError, match="at least one token per frame"):
            duet_vlm.make(name, budget=FRAMES - 1).resolve(video)
    for name in ("pool", "duet"):  # their solvers round the LLM input to whole frames, one each at least
        assert duet_vlm.make(name, budget=FRAMES - 1).resolve(video).schedule.llm_input == FRAMES


class _RecordScores(duet_vlm.VisionStage):
    """A vision stage that records the scores it is given and keeps every token."""

    def __init__(self, seen: list):
        self.seen = seen

    def reduce(self, view, keep):
        self.seen.append(view.cls_attention.clone())
        units, tokens = view.features.shape[:2]
        kept = torch.arange(tokens - keep, tokens).expand(units, -1)
        return duet_vlm.VisionReduction(view.features[:, tokens - keep :], kept)


class _ScoresRecorder(duet_vlm.Reducer):
    def __init__(self):
        self.seen = []

    def plan(self, geometry):
        schedule = duet_vlm.Schedule(geometry.num_layers, geometry.visual_tokens, geometry.visual_tokens)
        return duet_vlm.Plan(schedule, vision=_RecordScores(self.seen))


def test_video_scores_of_a_clip_tower_onevision_are_its_cls_attention_pooled():
    """LLaVA-OneVision with a CLIP tower (its CLS dropped from the features, kept in the scores) and a
    video: the scores a vision stage gets for each frame are the feature layer's CLS-to-patch
    attention (the tower's own attention map, eager, summed over heads), pooled as the model pools
    the frame's features. Catches the CLS offset of video scores taken off by one (every other
    video model in the tests has a SigLIP tower, without a CLS token)."""
    model = make_llava_onevision(tower="clip", layers=6, attn="eager")
    inputs = ov_batch([[("video", None)]], seed=3)
    reducer = _ScoresRecorder()
    with torch.no_grad(), reducer(model):
        model(**inputs)
    (seen,) = reducer.seen
    layer = model.config.vision_feature_layer  # -2: the output of the tower's second-to-last layer
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values_videos"].flatten(0, 1), output_attentions=True)
        cls = tower.attentions[layer][:, :, 0, 1:].sum(dim=1)  # (frames, patches)
        expected = model.model.apply_pooling(cls[..., None])[..., 0]
    torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-6)


def test_anyres_slots_traced_where_the_projector_run_again_rounds_apart(llava_next, monkeypatch):
    """A GPU's kernels may round the projector the runtime runs again apart from the model's own run
    (an H200 in float32: a few units in the last place): each slot is traced to the tile and patch of
    the nearest projected row, the same layout, logits and kept tokens as exact rounding gives. A
    row too far from every projection (an image resized after the projector) stays untraced."""
    from duet_vlm.adapters import llava_next as adapter_module

    inputs = next_batch([[(112, 112)], [(56, 112), (100, 60)]], seed=2, suffixes=[7, 3])
    calls = []

    def run():
        calls.clear()
        reducer = duet_vlm.make("visionzip", ratio=0.5)
        with torch.no_grad(), reducer(llava_next):
            logits = llava_next(**inputs).logits
        return logits, [(i.vision_kept.tolist(), i.entry_units.tolist(), i.kept_ids.tolist()) for i in reducer.stats.items]

    exact = run()

    def rounds_apart(module, args, output):  # the model's call, then the trace's (then the vision stage's)
        calls.append(output.shape)
        return torch.nextafter(output, 2 * output) * (1 + 3e-7) if len(calls) == 2 else output

    handle = llava_next.model.multi_modal_projector.register_forward_hook(rounds_apart)
    try:
        logits, layout = run()
        assert layout == exact[1] and calls[0] == calls[1]
        torch.testing.assert_close(logits, exact[0], rtol=0, atol=0)
        monkeypatch.setitem(adapter_module.TRACE_TOLERANCE, torch.float32, 1e-9)
        with pytest.raises(ValueError, match="could not be traced to its tiles"):
            run()
    finally:
        handle.remove()


def test_onevision_image_resized_after_projection_is_refused(tmp_path):
    """A 448x448 image on a 4x4-tile pinpoint exceeds anyres_max_9: OneVision interpolates its grid
    after the projector, no slot is within rounding of a projected patch, and a vision-side method
    refuses it with the reason rather than guessing a layout."""
    from PIL import Image

    from duet_vlm.compare import load_processor
    from duet_vlm.tiny.checkpoints import load_hf, write_llava_onevision

    folder = write_llava_onevision(tmp_path / "ov", largest_grid=4)
    model, processor = load_hf(folder), load_processor(str(folder))
    picture = Image.fromarray(torch.randint(0, 256, (448, 448, 3), generator=torch.Generator().manual_seed(7),
                                            dtype=torch.uint8).numpy())
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=[picture], text=[text], return_tensors="pt")
    with pytest.raises(ValueError, match="resized after the projector"), torch.no_grad(), \
            duet_vlm.make("visionzip", budget=48)(model):
        model(**inputs)
