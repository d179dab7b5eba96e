"""PixelPrune (issue #36): tokens whose pixels their neighbours predict never enter the vision encoder.

- the selection replays the official ``Pred2DSelector`` (``a870e31``) on its recorded outputs
  (``pixelprune-official.*``): every metric, anchored and sliding, on a screenshot, a photograph,
  colour blocks and a short image; and each Qwen family, fed those pixels through its processor's
  normalisation, leaves exactly those tokens out;
- the encoder sees only the kept patches, and its output equals the unpatched blocks fed those
  patches (their rotary positions, learned position embeddings, one segment per image and, on
  Qwen2.5-VL, the windows rebuilt here from their definition); on LLaVA's CLIP and SigLIP towers,
  the unpatched layers fed each image's CLS and kept rows of its embeddings, one image at a time,
  while the batch ran padded under a key mask;
- nothing repeated: bit-identical to the unpatched model; every check of ``duet-vlm check`` (padded
  batch = rows, counts = plan, the language model's ideal, the generation modes, restored) passes
  on every family that supports it, images and videos together; elsewhere it is refused at attach
  and leaves nothing behind; options and budgets are refused clearly.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import duet_vlm
from duet_vlm.check import check_model
from duet_vlm.methods.pixelprune import predictive_keep

from checks import assert_check_passes, hook_ids
from models import FAMILIES, QWEN_IMAGE, VEND, VSTART

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
LLAVA = ["llava", "llava-siglip"]  # CLIP (CLS) and SigLIP towers: rows left out after the embeddings
OTHERS = [name for name in sorted(FAMILIES) if not name.startswith("qwen") and name not in LLAVA]
NAMES = {"max-0": {}, "max-0.05": dict(threshold=0.05), "mae-0.02": dict(metric="mae", threshold=0.02),
         "rmse-0.03-sliding": dict(metric="rmse", threshold=0.03, anchored=False),
         "exact-0.1": dict(metric="exact", threshold=0.1)}


@pytest.fixture(scope="module")
def recorded(reference_dir):
    record = json.loads((reference_dir / "pixelprune-official.json").read_text())
    return record, load_file(reference_dir / "pixelprune-official.safetensors")


def _grouped(frame0: torch.Tensor, grid) -> torch.Tensor:
    """Frame-0 patches ``(h * w, C * P * P)`` -> one row per merged token ``(h / 2, w / 2, 4 * C * P * P)``."""
    _, h, w = grid
    return frame0.reshape(h // 2, w // 2, -1)


def _model_inputs(model, frame0: torch.Tensor, grid, adapter_cls) -> dict:
    """One prompt holding the image, its pixels as the processor gives them: both temporal frames of
    each patch, normalised with the family's mean and std."""
    channels = model.config.vision_config.in_channels
    patch = model.config.vision_config.patch_size
    mean = torch.tensor(adapter_cls.pixel_mean)[None, :, None, None, None]
    std = torch.tensor(adapter_cls.pixel_std)[None, :, None, None, None]
    frames = frame0.view(-1, channels, 1, patch, patch).expand(-1, -1, 2, -1, -1)
    pixel_values = ((frames - mean) / std).reshape(frames.shape[0], -1)
    tokens = grid[1] * grid[2] // 4
    input_ids = torch.tensor([[1, 20, 21, VSTART] + [QWEN_IMAGE] * tokens + [VEND, 30, 31, 32]])
    return {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == QWEN_IMAGE).long(),
        "pixel_values": pixel_values, "image_grid_thw": torch.tensor([grid]),
    }


@pytest.mark.parametrize("config", sorted(NAMES))
def test_the_selection_replays_the_official_code(recorded, config):
    record, tensors = recorded
    assert record["official_run"]["commit"].startswith("a870e31")
    options = NAMES[config]
    for image, meta in record["images"].items():
        grid = meta["grid_thw"]
        keep = predictive_keep(_grouped(tensors[f"{image}_pixels"], grid), options.get("metric", "max"),
                               options.get("threshold", 0.0), options.get("anchored", True))
        assert keep.flatten().nonzero()[:, 0].tolist() == record["kept"][config][image], (config, image)


def test_the_recorded_cases_tell_the_settings_apart(recorded):
    """The replay is a test: the recorded photograph keeps 36, 8, 9 and 1 of its 36 tokens under the
    settings, and the other images keep a few of many (an off-by-one neighbour would show)."""
    kept = recorded[0]["kept"]
    assert [len(kept[c]["photo"]) for c in ("max-0", "max-0.05", "mae-0.02", "rmse-0.03-sliding")] == [36, 8, 9, 1]
    assert len(kept["max-0"]["screenshot"]) == 31 and len(kept["max-0"]["blocks"]) == 10


@pytest.mark.parametrize("config", ["max-0", "max-0.05", "mae-0.02"])
@pytest.mark.parametrize("family_name", QWEN)
def test_each_family_leaves_the_recorded_tokens_out(recorded, family_name, config):
    record, tensors = recorded
    model = FAMILIES[family_name].model()
    adapter_cls = type(duet_vlm.adapter_for(model))
    for image in ("screenshot", "photo"):
        grid = record["images"][image]["grid_thw"]
        reducer = duet_vlm.make("pixelprune", **NAMES[config])
        with torch.no_grad(), reducer(model):
            model(**_model_inputs(model, tensors[f"{image}_pixels"], grid, adapter_cls))
        (item,) = reducer.stats.items
        expected = record["kept"][config][image]
        assert item.tokens_per_layer == [len(expected)] * len(item.tokens_per_layer)
        if len(expected) < item.tokens:
            assert item.vision_kept[0].tolist() == expected, (family_name, config, image)
        else:
            assert item.vision_kept is None  # every token entered: nothing to choose


# ----------------------------------------------------------------------------- the encoder
def _ideal_tower(visual, pixel_values, grid, keep_units):
    """The unpatched tower's own modules fed the kept patches: patch embedding, learned position
    embedding (Qwen3-VL, Qwen3.5) and rotary position of each kept patch, one attention segment over
    the kept patches, and on Qwen2.5-VL each window (``window_size`` pixels square, from the top-left)
    over its own kept patches. Returns the merged features of the kept tokens, in raster order, and
    the DeepStack features."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    grid_t = torch.tensor([grid])
    kept = keep_units.repeat_interleave(4)
    x = visual.patch_embed(pixel_values)[kept]
    if hasattr(visual, "pos_embed"):
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid_t, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=2,
        )
        x = x + (visual.pos_embed(indices[kept]) * weights[kept][:, :, None]).sum(1)
    position_embeddings = visual.rotary_pos_emb(x, get_vision_position_ids(grid_t, 2)[kept])
    units = keep_units.nonzero()[:, 0].tolist()
    cols = grid[2] // 2
    windows = getattr(visual, "fullatt_block_indexes", None)
    if windows is not None:
        side = visual.config.window_size // 2 // visual.config.patch_size
        key = {u: ((u // cols) // side, (u % cols) // side) for u in units}
        order = sorted(range(len(units)), key=lambda i: (key[units[i]], units[i]))
        lengths = [sum(1 for u in units if key[u] == k) for k in dict.fromkeys(key[units[i]] for i in order)]
    else:
        order, lengths = list(range(len(units))), [len(units)]
    index = torch.tensor(order)
    x = x.view(len(units), 4, -1)[index].flatten(0, 1)
    position_embeddings = tuple(p.view(len(units), 4, -1)[index].flatten(0, 1) for p in position_embeddings)

    def cu(sizes):
        return torch.tensor([0] + sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32) * 4

    deepstack = []
    for layer, block in enumerate(visual.blocks):
        full = windows is None or layer in windows
        x = block(x, cu_seqlens=cu([len(units)] if full else lengths), position_embeddings=position_embeddings)
        if layer in getattr(visual, "deepstack_visual_indexes", ()):
            merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(layer)]
            deepstack.append(merger(x)[torch.argsort(index)])
    return visual.merger(x)[torch.argsort(index)], deepstack


@pytest.mark.parametrize("family_name", QWEN)
def test_the_encoder_runs_on_the_kept_patches_as_its_blocks_would(recorded, family_name):
    record, tensors = recorded
    model = FAMILIES[family_name].model()
    visual = model.model.visual
    grid = record["images"]["screenshot"]["grid_thw"]
    inputs = _model_inputs(model, tensors["screenshot_pixels"], grid, type(duet_vlm.adapter_for(model)))
    keep_units = torch.zeros(grid[1] * grid[2] // 4, dtype=torch.bool)
    keep_units[record["kept"]["max-0"]["screenshot"]] = True

    seen, outputs = [], []
    reducer = duet_vlm.make("pixelprune")
    with torch.no_grad(), reducer(model):
        probes = [visual.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0])),
                  # read at once: get_image_features then splits the output in place
                  visual.register_forward_hook(lambda m, args, out: outputs.append(
                      (out.pooler_output, list(getattr(out, "deepstack_features", None) or []))))]
        try:
            model(**inputs)
        finally:
            for probe in probes:
                probe.remove()
        ideal, deepstack = _ideal_tower(visual, inputs["pixel_values"], grid, keep_units)
    assert seen == [4 * int(keep_units.sum())]  # 124 of the 384 patches entered the encoder
    ((merged, stacked),) = outputs
    torch.testing.assert_close(merged[keep_units], ideal, rtol=0, atol=2e-6)
    assert not merged[~keep_units].any()
    for got, want in zip(stacked, deepstack, strict=True):
        torch.testing.assert_close(got[keep_units], want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("family_name", QWEN + LLAVA)
def test_nothing_repeated_is_bit_identical_to_the_unpatched_model(family_name):
    """Noise pixels: every token enters, through the same precomputed-arguments path (on LLaVA,
    nothing is gathered or masked)."""
    family = FAMILIES[family_name]
    model = family.model()
    batch = family.batch(model)
    with torch.no_grad():
        plain = model(**batch).logits
        reducer = duet_vlm.make("pixelprune")
        with reducer(model):
            reduced = model(**batch).logits
    assert torch.equal(plain, reduced)
    assert all(item.average_tokens == item.tokens for item in reducer.stats.items)


def _blocky(batch: dict, seed: int = 0, per_frame: bool = False) -> dict:
    """The batch with its images' and videos' tokens repeating their left neighbour in runs (each
    merged token's four patches copied whole), so that PixelPrune leaves some of every item out
    (``per_frame``: runs of their own in each temporal slice, which then leave different counts out)."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(batch)
    for pixels, grids in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if pixels not in batch:
            continue
        values, offset = batch[pixels].clone(), 0
        for t, h, w in batch[grids].tolist():
            units = values[offset : offset + t * h * w].view(t, h // 2, w // 2, -1)
            for c in range(1, w // 2):
                copy = torch.rand(t if per_frame else 1, h // 2, generator=generator) < 0.6
                units[:, :, c][copy.expand(t, -1)] = units[:, :, c - 1][copy.expand(t, -1)]
            offset += t * h * w
        out[pixels] = values
    return out


@pytest.mark.parametrize("family_name", [
    # Qwen2.5-VL (windows) and the LLaVA towers (a padded, masked batch) in the default suite; the
    # other Qwen families in the marked matrix suite (CI runs both)
    pytest.param(name, marks=() if name in ("qwen2_5_vl", *LLAVA) else pytest.mark.matrix)
    for name in QWEN + ["qwen3_5-moe"] + LLAVA
])
def test_every_check_passes_on_the_families_it_supports(family_name):
    family = FAMILIES[family_name]
    model = family.model()
    batch = (_blocky_images if family_name in LLAVA else _blocky)(family.batch(model))
    rows = [family.row(batch, b) for b in range(2)]
    report = check_model(model, batch, rows, "pixelprune", rounds=1, new_tokens=3, skip=("timing",))
    assert_check_passes(report, family_name)  # or not applicable for a reason the suite expects (a release's refusal)
    counts = report.result("counts").numbers
    assert counts["visual_per_layer"] == counts["planned"]
    reducer = duet_vlm.make("pixelprune")
    with torch.no_grad(), reducer(model):
        model(**batch)
    reduced = [item for item in reducer.stats.items if item.average_tokens < item.tokens]
    assert reduced, "the blocky batch left nothing out"


def test_the_count_follows_the_content(recorded):
    """A screenshot keeps 31 of its 96 tokens, a photograph (noise in every token) all of them."""
    record, tensors = recorded
    model = FAMILIES["qwen2_vl"].model()
    adapter_cls = type(duet_vlm.adapter_for(model))
    counts = {}
    for image in ("screenshot", "photo", "blocks"):
        reducer = duet_vlm.make("pixelprune")
        with torch.no_grad(), reducer(model):
            model(**_model_inputs(model, tensors[f"{image}_pixels"], record["images"][image]["grid_thw"], adapter_cls))
        counts[image] = (reducer.stats.items[0].average_tokens, reducer.stats.items[0].tokens)
    assert counts == {"screenshot": (31, 96), "photo": (36, 36), "blocks": (10, 60)}


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("family_name", OTHERS)
def test_refused_where_the_tower_encodes_whole_images_leaving_nothing_behind(family_name):
    model = FAMILIES[family_name].model()
    before = hook_ids(model)
    with pytest.raises(ValueError, match="cannot leave patches out.*Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-1.5"):
        duet_vlm.make("pixelprune").attach(model)
    assert hook_ids(model) == before
    with duet_vlm.make("full")(model):  # the model is free for another reducer
        pass


@pytest.mark.parametrize("options, message", [
    (dict(budget=64), "pixelprune takes no budget or ratio"),
    (dict(ratio=0.5), "pixelprune takes no budget or ratio"),
    (dict(metric="l2"), "metric must be one of max, mae, rmse, exact, got 'l2'"),
    (dict(threshold=1.5), "threshold "),
    (dict(anchored="yes"), "anchored must be True or False"),
])
def test_bad_options_are_refused_when_built(options, message):
    with pytest.raises(ValueError, match=message):
        duet_vlm.make("pixelprune", **options)


def test_per_row_budgets_are_refused():
    with pytest.raises(ValueError, match="takes no budget, per row"):
        with duet_vlm.make("pixelprune").per_row(budget=[64]):
            pass


def test_the_record_rebuilds_the_reducer():
    reducer = duet_vlm.make("pixelprune", metric="mae", threshold=0.02)
    assert duet_vlm.from_dict(reducer.to_dict()) == reducer
    assert "_count" not in reducer.to_dict()


# ----------------------------------------------------------------------------- the bench
def test_the_encoder_benchmark_times_the_tower_against_its_ideal():
    """``pixelprune_encoder_cost`` on a one-block tower at Qwen2.5-VL-7B's width: the document page
    keeps fewer tokens, the reduced tower's kept features equal the ideal's bit for bit, and the
    blocks' FLOPs follow the kept patches (no timing asserted)."""
    from duet_vlm.bench.vision import pixelprune_encoder_cost

    result = pixelprune_encoder_cost(depth=1, grid=(16, 16), rounds=1)
    assert result["kept_features_equal_ideal"]
    assert 0 < result["kept_tokens"] < result["merged_tokens"] == 64
    assert set(result["seconds"]) == {"tower", "pixelprune", "ideal", "selection"}
    flops = result["block_flops"]
    assert 0 < flops["kept"] < flops["tower"]
    assert flops["ratio"] < 1 and flops["ratio"] > result["kept_tokens"] / result["merged_tokens"] - 0.05


def test_the_clip_encoder_benchmark_times_the_tower_against_its_ideal():
    """``clip_pixelprune_encoder_cost`` on a two-layer CLIP-L tower: the document page at threshold 0
    and the demo scene at mae 0.05 keep fewer patches, the kept features equal the ideal's (its own
    layers fed the kept rows) bit for bit, and the FLOPs follow the kept rows."""
    from duet_vlm.bench.vision import clip_pixelprune_encoder_cost

    for image, options in (("document", {}), ("scene", dict(metric="mae", threshold=0.05))):
        result = clip_pixelprune_encoder_cost(depth=2, image=image, rounds=1, **options)
        assert result["kept_features_equal_ideal"], image
        assert 0 < result["kept_tokens"] < 576 and result["options"] == options
        assert set(result["seconds"]) == {"tower", "pixelprune", "ideal", "selection"}
        assert 0 < result["block_flops"]["kept"] < result["block_flops"]["tower"]


def test_the_statistics_and_the_overlay_name_what_never_entered_the_encoder(recorded, tmp_path):
    from PIL import Image

    from duet_vlm.compare import draw_item_overlay

    record, tensors = recorded
    model = FAMILIES["qwen2_5_vl"].model()
    grid = record["images"]["screenshot"]["grid_thw"]
    reducer = duet_vlm.make("pixelprune")
    with torch.no_grad(), reducer(model):
        model(**_model_inputs(model, tensors["screenshot_pixels"], grid, type(duet_vlm.adapter_for(model))))
    (item,) = reducer.stats.items
    kept = record["kept"]["max-0"]["screenshot"]
    assert item.never_encoded.tolist() == [t for t in range(96) if t not in kept]
    assert item.entry_slots.tolist() == kept and item.budget == len(kept)
    import numpy as np

    from duet_vlm.compare import draw_rows_overlay

    def red_pixels(path) -> int:
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(((pixels[..., 0] - pixels[..., 1]) > 60).sum())

    picture = Image.new("RGB", (grid[2] * 14, grid[1] * 14), "white")
    assert red_pixels(draw_item_overlay(picture, item, tmp_path / "item.png")) > 1000
    assert red_pixels(draw_rows_overlay([picture], reducer.stats, tmp_path / "rows.png", ["pixelprune"])) > 1000
    item.never_encoded = None  # the same item as another method reports it: nothing red
    assert red_pixels(draw_item_overlay(picture, item, tmp_path / "plain.png")) == 0


def test_with_every_token_kept_the_subset_windows_are_the_models_own():
    """``subset_windows`` with nothing left out gives transformers' own window permutation and
    lengths, on grids whose windows are cut by the image's edge (the scores' order relies on it)."""
    adapter = duet_vlm.adapter_for(FAMILIES["qwen2_5_vl"].model())
    for grid in ([1, 8, 12], [1, 6, 10], [2, 4, 6], [1, 2, 2]):
        grid = torch.tensor([grid])
        units = int(grid.prod()) // 4
        index, lengths = adapter.subset_windows(grid, torch.ones(units, dtype=torch.bool))
        own_index, own_lengths = adapter.windows(grid)
        assert torch.equal(index, own_index) and torch.equal(lengths, own_lengths), grid.tolist()


# ----------------------------------------------------------------------------- LLaVA: CLIP and SigLIP towers
def _blocky_images(batch: dict, seed: int = 0, share: float = 0.6) -> dict:
    """LLaVA's images with patches repeating their left neighbour in runs (each patch copied whole):
    the images keep different counts."""
    generator = torch.Generator().manual_seed(seed)
    pixels = batch["pixel_values"]
    n, c, h, w = pixels.shape
    units = pixels.view(n, c, h // 14, 14, w // 14, 14).permute(0, 2, 4, 1, 3, 5).contiguous()
    for col in range(1, w // 14):
        copy = torch.rand(n, h // 14, generator=generator) < share
        units[:, :, col][copy] = units[:, :, col - 1][copy]
    return {**batch, "pixel_values": units.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)}


def _tower_layers(tower, x):
    """Every hidden state of the unpatched tower's layers fed ``x`` (``(1, T, C)``, its embeddings'
    rows), as transformers numbers them: the layers' input first."""
    x = tower.pre_layrnorm(x) if hasattr(tower, "pre_layrnorm") else x
    states = [x]
    for layer in tower.encoder.layers:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
        states.append(x)
    return states


@pytest.mark.parametrize("family_name", LLAVA)
def test_clip_and_siglip_towers_encode_the_kept_rows_as_their_layers_would(family_name):
    family = FAMILIES[family_name]
    model = family.model()
    tower, adapter = model.model.vision_tower, duet_vlm.adapter_for(model)
    batch = _blocky_images(family.batch(model))
    keep = torch.stack([predictive_keep(unit) for unit in adapter.unit_pixels(batch["pixel_values"])]).flatten(1)
    counts = keep.sum(dim=1).tolist()
    assert counts[0] != counts[1] and max(counts) < keep.shape[1]  # uneven: the batch runs padded, masked
    cls = int(adapter.geometry.has_cls)

    seen, outputs = [], []
    reducer = duet_vlm.make("pixelprune")
    with torch.no_grad(), reducer(model):
        probes = [tower.encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2]))),
                  tower.register_forward_hook(lambda m, args, out: outputs.append(out.hidden_states)),
                  model.model.multi_modal_projector.register_forward_pre_hook(
                      lambda m, args: seen.append(tuple(args[0].shape[:2])))]
        try:
            model(**batch)
        finally:
            for probe in probes:
                probe.remove()
        projected = model.model.get_image_features(  # what LLaVA scatters into the placeholders
            batch["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
        embeddings = tower.embeddings(batch["pixel_values"])
        for b in range(2):
            rows = torch.cat([torch.zeros(cls, dtype=torch.long), keep[b].nonzero()[:, 0] + cls])
            ideal = _tower_layers(tower, embeddings[b : b + 1, rows])
            slots = keep[b] if not adapter.slots_have_cls else torch.cat([torch.ones(1, dtype=torch.bool), keep[b]])
            want = model.model.multi_modal_projector(ideal[-2][0, int(cls and not adapter.slots_have_cls):])
            torch.testing.assert_close(projected[b][slots], want, rtol=1e-5, atol=1e-5)
            assert not projected[b][~slots].any()
            compared = []
            for index, (got, want) in enumerate(zip(outputs[0], ideal, strict=True)):
                if got is None:  # transformers 5.20 and newer keep only the hidden states LLaVA reads
                    continue
                compared.append(index)
                # SDPA masked vs not; the layer after the feature layer, which only releases before 5.20
                # keep, has drifted 1.02e-5 from its ideal (5.19.0)
                tolerance = 1e-5 if index <= len(ideal) - 2 else 3e-5
                torch.testing.assert_close(got[b, rows], want[0], rtol=1e-5, atol=tolerance)
                left_out = torch.ones(got.shape[1], dtype=torch.bool)
                left_out[rows] = False
                assert not got[b, left_out].any()
            assert len(ideal) - 2 in compared  # the feature layer's (-2), whichever others the release keeps
    # only the kept rows (and the shorter image's padding) reach the layers, and LLaVA's projector
    # (its slots: without the CLS row under the "default" strategy); then the language model's entry
    # projects each image's kept features, as for every vision-side method
    slots_cls = int(adapter.slots_have_cls)
    assert seen[:2] == [(2, cls + max(counts)), (2, slots_cls + max(counts))]
    assert sorted(seen[2:]) == sorted((1, count) for count in counts)
    assert [item.budget for item in reducer.stats.items] == counts


def test_on_clip_the_statistics_and_the_overlay_name_the_patches_that_never_entered(tmp_path):
    import numpy as np
    from PIL import Image

    from duet_vlm.compare import draw_item_overlay

    model = FAMILIES["llava"].model()
    adapter = duet_vlm.adapter_for(model)
    batch = _blocky_images(FAMILIES["llava"].one(model))
    keep = predictive_keep(adapter.unit_pixels(batch["pixel_values"])[0]).flatten()
    reducer = duet_vlm.make("pixelprune")
    with torch.no_grad(), reducer(model):
        model(**batch)
    (item,) = reducer.stats.items
    assert item.never_encoded.tolist() == (~keep).nonzero()[:, 0].tolist()  # slots: patch order, CLS has none
    assert item.budget == int(keep.sum()) == item.tokens_per_layer[0] < item.tokens

    def red_pixels(path) -> int:
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(((pixels[..., 0] - pixels[..., 1]) > 60).sum())

    picture = Image.new("RGB", (112, 112), "white")
    assert red_pixels(draw_item_overlay(picture, item, tmp_path / "item.png")) > 1000
    item.never_encoded = None  # the same item as another method reports it: nothing red
    assert red_pixels(draw_item_overlay(picture, item, tmp_path / "plain.png")) == 0


def test_images_of_uneven_counts_are_refused_under_attention_without_a_key_mask(monkeypatch):
    """FlashAttention takes no additive mask: a call whose images keep different counts is refused
    with what to do; one image per call still runs."""
    model = FAMILIES["llava"].model()
    tower_config = model.model.vision_tower.config
    monkeypatch.setattr(type(tower_config), "_attn_implementation", property(lambda self: "flash_attention_2"), raising=False)
    batch = _blocky_images(FAMILIES["llava"].batch(model))
    before = hook_ids(model)
    with pytest.raises(ValueError, match="takes no key mask.*attn_implementation='sdpa'"):
        with torch.no_grad(), duet_vlm.make("pixelprune")(model):
            model(**batch)
    assert hook_ids(model) == before


# ----------------------------------------------------------------------------- duet-vlm eval
def test_eval_gives_a_method_without_a_budget_one_row_per_option_spec(tiny_demo_model, tmp_path):
    """``duet-vlm eval --methods pixelprune pixelprune:metric=mae,threshold=0.05``: one row each,
    whatever the budgets, built with those options and saved under a key that holds them."""
    from duet_vlm.demo import sweep

    spec = "pixelprune:metric=mae,threshold=0.05"
    run = sweep.evaluate_methods(["pixelprune", spec], (192, 64), n=7, model_path=tiny_demo_model, output_dir=tmp_path,
                                 batch_size=7, control=False)
    assert [(row["method"], row["budget"]) for row in run.rows] == [("full", None), ("pixelprune", None), (spec, None)]
    rows = {row["method"]: row for row in run.rows}
    assert duet_vlm.from_dict(rows[spec]["reducer"]) == duet_vlm.make("pixelprune", metric="mae", threshold=0.05)
    # the demo's scenes have noisy backgrounds: no exact repeats, and most patches within 0.05 on average
    assert rows["pixelprune"]["avg_visual_tokens"] == 576 > 2 * rows[spec]["avg_visual_tokens"]
    assert len(set(rows[spec]["item_tokens"])) > 1  # each image its own count
    saved = json.loads((tmp_path / "rows" / "pixelprune_metric_mae_threshold_0.05-all.json").read_text())
    assert saved["key"]["options"] == {"metric": "mae", "threshold": 0.05}


@pytest.mark.parametrize("methods, message", [
    (["pixelprune:threshold"], "KEY=VALUE, comma-separated: 'pixelprune:threshold' has 'threshold'"),
    (["divprune+random_horizon:seed=1"], "options .* are for a single method, not a composition"),
    (["pixelprune:metric=l2"], "metric must be one of"),
    (["pixelprune", "pixelprune"], "a method spec is given twice"),
])
def test_eval_refuses_bad_method_specs_before_loading_a_model(methods, message, tmp_path):
    from duet_vlm.demo import sweep

    with pytest.raises(ValueError, match=message):
        sweep.evaluate_methods(methods, n=7, model_path=tmp_path / "no model", output_dir=tmp_path)



def _never_by_hand(model, family_name, batch) -> dict:
    """Per modality, per visual item of ``batch`` in prompt order, the slots ``predictive_keep``
    leaves out of it (raster order); ``None`` for a video whose slices are one item (Qwen2-VL,
    Qwen2.5-VL): it enters the encoder whole."""
    adapter = duet_vlm.adapter_for(model)
    if family_name in LLAVA:
        return {"image": [(~predictive_keep(pixels).flatten()).nonzero()[:, 0]
                          for pixels in adapter.unit_pixels(batch["pixel_values"])]}
    out = {"image": [], "video": []}
    for modality, pixels, grids in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
        for units in adapter.unit_pixels(batch[pixels], batch[grids]):
            if len(units) > 1 and not adapter.slices_are_items:
                out[modality].append(None)
            else:  # an image, or each slice of a video (Qwen3-VL: an item each)
                out[modality] += [(~predictive_keep(unit).flatten()).nonzero()[:, 0] for unit in units]
    return out


@pytest.mark.parametrize("family_name", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_the_statistics_and_the_overlay_name_what_each_item_of_a_batch_left_out(family_name):
    """A batch of blocky images (and videos) whose items leave different counts out, reduced in one
    call: each item's ``never_encoded`` is exactly the slots ``predictive_keep`` leaves out of its
    own pixels (none more, none of another item), and the overlay paints exactly those cells red; a
    video that enters whole names none."""
    from duet_vlm.compare import paint_never_encoded

    family = FAMILIES[family_name]
    model = family.model()
    batch = family.batch(model)
    batch = _blocky_images(batch) if family_name in LLAVA else _blocky(batch, 1, per_frame=True)
    expected = _never_by_hand(model, family_name, batch)
    reducer = duet_vlm.make("pixelprune")
    with torch.no_grad(), reducer(model):
        model(**batch)
    items = reducer.stats.items
    assert len({len(never) for never in expected["image"]}) > 1  # the images leave different counts out
    if family_name == "qwen3_vl":  # the video's slices, encoded together, too
        assert len({len(never) for never in expected["video"]}) > 1
    for item in items:
        never = expected[item.modality].pop(0)
        if never is None:
            assert item.never_encoded is None
            continue
        assert item.never_encoded.tolist() == never.tolist(), (item.row, item.modality)
        (_, rows, cols), = item.views
        layer = np.zeros((rows, cols, 4))
        paint_never_encoded(layer, item, 0)
        red = torch.zeros(rows * cols, dtype=torch.bool)
        red[never] = True
        assert torch.equal(torch.from_numpy(layer[..., 3] > 0).flatten(), red), (item.row, item.modality)
    assert all(not left for left in expected.values())  # every item was named


@pytest.mark.parametrize("has_cls", [False, True])
def test_the_units_of_one_item_keep_what_entered_and_name_what_did_not(has_cls):
    """``EnteredTokens`` on a view of three units that left 2, 4 and 0 of their 8 tokens out (a CLS
    token first on a CLIP tower: it enters, and is neither kept nor named): each unit's first
    ``counts[u]`` outputs are its entered tokens in order, with their features, and each row of the
    ``never_encoded`` role holds its own left-out tokens in order, then -1 (none of another unit's,
    none that entered)."""
    from duet_vlm.methods.pixelprune import EnteredTokens
    from duet_vlm.plan import VisionView

    offset = int(has_cls)
    out = [[1, 6], [0, 2, 3, 7], []]  # 6, 4 and 8 entered: 6 a unit on average
    entered = torch.ones(3, offset + 8, dtype=torch.bool)
    for unit, left in enumerate(out):
        entered[unit, [offset + t for t in left]] = False
    features = torch.randn(3, offset + 8, 4, generator=torch.Generator().manual_seed(0))
    view = VisionView(features, torch.zeros(3, 8), torch.zeros(3, offset + 8, 2), (2, 4), has_cls, entered=entered)
    reduction = EnteredTokens().reduce(view, 6)
    assert reduction.counts.tolist() == [6, 4, 8]
    never = reduction.roles["never_encoded"]
    assert never.shape == (3, 4)
    for unit, left in enumerate(out):
        kept = [offset + t for t in range(8) if t not in left]
        count = len(kept)
        assert reduction.kept[unit, :count].tolist() == kept
        torch.testing.assert_close(reduction.features[unit, :count], features[unit, kept], rtol=0, atol=0)
        assert never[unit].tolist() == [offset + t for t in left] + [-1] * (4 - len(left)), unit
