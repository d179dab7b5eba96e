"""InternVL3 / 3.5 (``InternVLForConditionalGeneration``): tiny models of the real transformers class.

What is checked (the invariant matrix of tests/test_invariants.py runs every method on the
``internvl`` family of tests/models.py as well):
- ``full`` is bit-identical to the unpatched model, and the hooks are the ones before;
- an image is one item of all its tiles and its thumbnail, each tile ``side x side`` post-shuffle
  tokens, the tile count read from its run of placeholders;
- the pooled score: the feature layer's CLS-to-patch attention, taken from the tower's full eager
  attention map (the referee; the adapter never asks for it), summed over the 2x2 groups of the
  pixel shuffle, equals the adapter's, and its keys are the layer's keys averaged over the groups;
- a vision-side method with no language stage (VisionZip, dominant tokens only) equals the
  hand-built ideal: the unpatched model fed ``inputs_embeds`` holding the text and, of each image,
  the top tokens by the referee's pooled score, at every valid position; the same for a training
  step (loss and gradients), and with ``vision_feature_layer`` counted from the front (1, 2) or the
  back: the layer scored is the one whose output the model reads (0, the embeddings, is refused);
- a language-side method (FastV) equals its hand-built ideal: the unpatched decoder on every token
  up to layer K, then the top tokens by the referee's last-token attention of layer K - 1, with
  their original positions, at every valid position;
- bad inputs (a run of placeholders that is not whole tiles, placeholders asking for tiles
  ``pixel_values`` does not hold) give a clear ``ValueError``, leave the hooks as they were, and the
  reducer works on the next call; unsupported configs are refused at attach.
"""

import functools

import pytest
import torch

import duet_vlm
from duet_vlm.adapters import Capture, adapter_for
from duet_vlm.adapters.internvl import InternVLAdapter

from models import (
    INTERNVL_IMAGE,
    INTERNVL_ROWS,
    INTERNVL_TOKENS,
    LAYERS,
    internvl_batch,
    internvl_row,
    make_internvl,
)
from checks import (
    assert_step_equals_ideal,
    fastv_kept_by_hand,
    hook_ids,
    kept_slots,
    next_slots,
    placeholder_runs,
)

IMAGE = INTERNVL_IMAGE


# InternVL3 (InternViT-300M: LayerNorm, no q/k norm; a Qwen2 decoder) and a variant with the 6B
# InternViT's RMSNorm and q/k norms and InternVL3.5's Qwen3 decoder (per-head q/k norms).
VARIANTS = {
    "internvl3": {},
    "qk-norm-vit-qwen3": {"text": "qwen3", "use_qk_norm": True, "norm_type": "rms_norm"},
}


@functools.cache
def _models(variant: str):
    """``(model, referee)``: the SDPA model the reducers run on, one forward already run (transformers
    adds its output-capturing hooks at the first forward), and the same weights under eager
    attention: the referee's attention maps and the ideal's runs."""
    model = make_internvl(layers=LAYERS, **VARIANTS[variant])
    with torch.no_grad():
        model(**internvl_batch([[5]], seed=1))
    referee = make_internvl(attn="eager", layers=LAYERS, **VARIANTS[variant])
    state, theirs = model.state_dict(), referee.state_dict()
    assert state.keys() == theirs.keys() and all(torch.equal(state[k], theirs[k]) for k in state)
    return model, referee


@pytest.fixture(scope="module")
def internvl():
    return _models("internvl3")[0]


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    """``(model, referee)`` of each variant."""
    return _models(request.param)


def _entry_embeds(model, inputs) -> torch.Tensor:
    """``inputs_embeds`` as the unpatched language model receives them (images scattered in)."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def _pooled_by_hand(referee, pixel_values, feature_layer: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The feature layer's CLS-to-patch attention from the tower's full eager map (summed over
    heads), summed over each 2x2 group of patches the 0.5 pixel shuffle concatenates; the layer's
    keys (mean over heads) averaged over the same groups; the layer's input. ``feature_layer`` is
    ``vision_feature_layer``: the features are ``hidden_states[feature_layer]``, the output of
    encoder layer ``feature_layer - 1`` (``hidden_states[0]`` is the embeddings)."""
    tower = referee.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    index = feature_layer - 1 if feature_layer > 0 else len(out.attentions) + feature_layer
    maps, states = out.attentions[index], out.hidden_states[index]  # the layer's map and its input
    tiles, heads, tokens, _ = maps.shape
    side = int((tokens - 1) ** 0.5)
    cls = maps[:, :, 0, 1:].sum(dim=1).view(tiles, side // 2, 2, side // 2, 2)
    scores = cls.sum(dim=(2, 4)).reshape(tiles, -1)  # token (i, j) = patches rows 2i..2i+1, cols 2j..2j+1
    layer = tower.encoder.layer[index]
    with torch.no_grad():
        keys = layer.attention.k_norm(layer.attention.k_proj(layer.layernorm_before(states)))
        keys = keys.view(tiles, tokens, heads, -1).mean(dim=2)
    keys = keys[:, 1:].reshape(tiles, side // 2, 2, side // 2, 2, -1).mean(dim=(2, 4)).reshape(tiles, -1, keys.shape[-1])
    return scores, keys, states


# ----------------------------------------------------------------------------- no-op, items
def test_full_is_bit_identical_and_hooks_restored(pair):
    internvl, _ = pair
    inputs = internvl_batch(INTERNVL_ROWS, seed=4, suffixes=[2, 6])
    hooks = hook_ids(internvl)
    with torch.no_grad():
        plain = internvl(**inputs).logits
        with duet_vlm.make("full")(internvl):
            reduced = internvl(**inputs).logits
    assert torch.equal(plain, reduced)
    assert hook_ids(internvl) == hooks


def test_an_image_is_one_item_of_all_its_tiles(internvl):
    """Row 0: 2x2 tiles + thumbnail (80 tokens); row 1: 1x2 tiles + thumbnail (48), then a single
    tile (16): three items, one per image, whose slots name their tiles (thumbnail last)."""
    inputs = internvl_batch(INTERNVL_ROWS, seed=2, suffixes=[7, 3])
    reducer = duet_vlm.make("duet", ratio=0.5)
    with torch.no_grad(), reducer(internvl):
        internvl(**inputs)
    items = reducer.stats.items
    assert [(i.row, i.tokens, i.units) for i in items] == [(0, 80, 1), (1, 48, 1), (1, 16, 1)]
    assert [name for name, _, _ in items[0].views] == ["tile 0", "tile 1", "tile 2", "tile 3", "thumbnail"]
    assert [name for name, _, _ in items[2].views] == ["tile 0"]
    assert all((rows, cols) == (4, 4) for _, rows, cols in items[0].views)
    adapter = adapter_for(internvl)
    assert isinstance(adapter, InternVLAdapter)
    found = adapter.find_items(inputs["input_ids"], {})
    assert [(i.geometry.visual_tokens, i.geometry.grid, i.layout.tiles) for i in found] == [
        (80, (20, 4), 5), (48, (12, 4), 3), (16, (4, 4), 1)
    ]


# ----------------------------------------------------------------------------- the signal
def test_pooled_scores_equal_the_eager_map_pooled_over_the_shuffle(pair):
    """The adapter's scores and keys (from the feature layer's own projections on its input) equal
    the referee's: the full eager map's CLS row summed over heads and over each 2x2 group the pixel
    shuffle makes one token, the keys averaged over it; the groups are the model's own shuffle."""
    internvl, referee = pair
    pixel_values = internvl_batch([[5]], seed=5)["pixel_values"]
    scores, keys, states = _pooled_by_hand(referee, pixel_values)
    adapter = adapter_for(internvl)
    groups = adapter.shuffle_groups(8)
    assert groups[0].tolist() == [0, 1, 8, 9] and groups[5].tolist() == [18, 19, 26, 27]
    mine, my_keys = adapter.layer_scores(adapter.towers["image"], states)
    torch.testing.assert_close(mine, scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(my_keys, keys, rtol=1e-5, atol=1e-6)
    # Another encoder layer a stage reads (VScan's, TRIO's shallow layer 0): pooled the same way.
    with torch.no_grad():
        out = referee.model.vision_tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    first = out.attentions[0][:, :, 0, 1:].sum(dim=1).view(len(states), 4, 2, 4, 2).sum(dim=(2, 4)).flatten(1)
    capture = Capture(states, states, (len(states),), ({"layers": {0: (out.hidden_states[0], {})}},))
    signals = adapter.vision_signals(capture, "image", (0,))
    torch.testing.assert_close(signals.scores, scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(signals.maps[0], first, rtol=0, atol=1e-5)
    # Sums keep each tile's mass: a tile's post-shuffle scores add up to its patches' scores.
    patches = out.attentions[-1][:, :, 0, 1:].sum(dim=(1, 2))
    torch.testing.assert_close(signals.scores.sum(dim=1), patches, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- hand-built ideals
def _dominant_only():
    return duet_vlm.make("visionzip", ratio=0.5, contextual=0)


def _vision_ideal(referee, inputs, feature_layer: int = -1):
    """Of each image, the top half of its tokens by the referee's pooled score (of ``feature_layer``);
    returns the kept positions (text and kept slots, in order) of row 0."""
    ids = inputs["input_ids"][0]
    scores = _pooled_by_hand(referee, inputs["pixel_values"], feature_layer)[0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    tile = 0
    for start, length in placeholder_runs(ids, IMAGE):
        tiles = length // INTERNVL_TOKENS
        image = scores[tile : tile + tiles].reshape(-1)
        tile += tiles
        keep[start : start + length] = False
        keep[start + image.topk(round(0.5 * length)).indices] = True
    return keep.nonzero()[:, 0]


@pytest.mark.parametrize("rows", [[[5]], [[3, 1]]], ids=["2x2+thumbnail", "1x2+thumbnail,single"])
def test_vision_side_method_equals_the_hand_built_ideal(pair, rows):
    """VisionZip with dominant tokens only (no merge, no language stage) keeps, of each image, the
    top tokens by the pooled CLS attention, in the slots they came from: the unpatched model fed
    those ``inputs_embeds`` (positions renumbered, the method's default) gives the same logits at
    every position."""
    internvl, referee = pair
    inputs = internvl_batch(rows, seed=13)  # the smallest margin at the cut: 9e-4 (scores agree to 1e-6)
    _dominant_only_equals_the_ideal(internvl, referee, inputs, _vision_ideal(referee, inputs))


def _dominant_only_equals_the_ideal(internvl, referee, inputs, kept):
    """VisionZip's dominant tokens alone keep the referee's choice ``kept`` (slots of row 0), and the
    reduced logits equal the unpatched referee fed those tokens, at every position."""
    reducer = _dominant_only()
    with torch.no_grad(), reducer(internvl):
        reduced = internvl(**inputs).logits[0]
    ids = inputs["input_ids"][0]
    slots = kept_slots(reducer, ids, IMAGE).sort().values
    assert slots.tolist() == kept[ids[kept] == IMAGE].tolist()  # the reducer kept the referee's choice
    embeds = _entry_embeds(referee, inputs)[:, kept]
    with torch.no_grad():
        ideal = referee(inputs_embeds=embeds, attention_mask=torch.ones(1, len(kept), dtype=torch.long)).logits[0]
    torch.testing.assert_close(reduced[next_slots(kept, len(ids))], ideal, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("feature_layer", [1, 2, -2])
def test_the_feature_layer_scored_is_the_one_whose_output_the_model_reads(feature_layer):
    """With ``vision_feature_layer`` counted from the front (1: the features are ``hidden_states[1]``,
    the output of encoder layer 0) or the back: the adapter scores with that layer, VisionZip
    (dominant tokens only) keeps the top tokens by its pooled CLS attention, and the unpatched model
    fed them gives the same logits at every position (the model's features read that layer too)."""
    internvl, referee = _models("internvl3")
    inputs = internvl_batch([[5]], seed=13)
    try:
        for model in (internvl, referee):
            model.config.vision_feature_layer = feature_layer
        adapter = adapter_for(internvl)
        scores, keys, states = _pooled_by_hand(referee, inputs["pixel_values"], feature_layer)
        mine, my_keys = adapter.layer_scores(adapter.towers["image"], states)
        torch.testing.assert_close(mine, scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(my_keys, keys, rtol=1e-5, atol=1e-6)
        _dominant_only_equals_the_ideal(internvl, referee, inputs, _vision_ideal(referee, inputs, feature_layer))
    finally:
        for model in (internvl, referee):
            model.config.vision_feature_layer = -1


def test_training_step_equals_the_ideal(pair):
    """With labels (the text), the reduced model's loss and gradients (projector, vision tower, first
    and last decoder layers) equal those of the unpatched model run on the kept tokens: its own
    tower, projector and scatter, then the kept slots alone."""
    internvl, _ = pair
    inputs = internvl_batch([[3, 1]], seed=7)
    ids = inputs["input_ids"]
    labels = ids.masked_fill(ids == IMAGE, -100)
    parts = {
        "projector": internvl.model.multi_modal_projector.linear_1.weight,
        "vision tower": internvl.model.vision_tower.encoder.layer[-1].mlp.fc1.weight,
        "first layer": internvl.model.language_model.layers[0].self_attn.q_proj.weight,
        "last layer": internvl.model.language_model.layers[-1].mlp.down_proj.weight,
    }
    reducer = _dominant_only()

    def ideal():
        keep = ids[0] != IMAGE
        keep[kept_slots(reducer, ids[0], IMAGE)] = True
        kept = keep.nonzero()[:, 0]
        base = internvl.model
        embeds = base.get_input_embeddings()(ids)
        features = base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        embeds = embeds.masked_scatter((ids == IMAGE)[..., None], features.to(embeds.dtype))
        return internvl(inputs_embeds=embeds[:, kept], attention_mask=torch.ones(1, len(kept), dtype=torch.long),
                        labels=labels[:, kept]).loss

    assert_step_equals_ideal(internvl, reducer, {**inputs, "labels": labels}, parts, ideal)


def test_language_side_method_equals_the_hand_built_ideal(pair):
    """FastV (K = 2 of 6 layers, a quarter of each image's tokens kept after it, ratio 0.5): the
    unpatched decoder runs layers 0..K-1 on every token; the tokens kept are, per image, the top by
    the last token's attention (mean over heads) in layer K - 1's full eager map; layers K.. run on
    text and kept tokens at their original positions. Logits equal at every position."""
    internvl, referee = pair
    inputs = internvl_batch([[3, 1]], seed=8)
    reducer = duet_vlm.make("fastv", ratio=0.5)
    with torch.no_grad(), reducer(internvl):
        reduced = internvl(**inputs).logits[0]
    items = reducer.stats.items
    (boundary, _), = items[0].stage_ids
    ids = inputs["input_ids"][0]
    lm = referee.model.language_model
    embeds = _entry_embeds(referee, inputs)
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, output_attentions=True, output_hidden_states=True)
    attention = out.attentions[boundary - 1][0, :, -1].mean(dim=0)  # the last token's row, mean over heads
    kept = fastv_kept_by_hand(attention, ids, IMAGE, items, boundary)
    hidden = out.hidden_states[boundary][:, kept]  # the input of layer K, at the kept tokens
    positions = kept[None]
    mask = torch.full((len(kept), len(kept)), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    with torch.no_grad():
        rope = lm.rotary_emb(hidden, positions)
        for layer in lm.layers[boundary:]:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        ideal = referee.lm_head(lm.norm(hidden))[0]
    torch.testing.assert_close(reduced[next_slots(kept, len(ids))], ideal, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bad inputs, refusals
def test_a_run_that_is_not_whole_tiles_is_a_clear_error(internvl):
    """Two images whose runs are 40 and 24 placeholders (the total, 4 tiles, matches the pixels, so
    transformers' own count check passes): a ValueError naming the tile size; the hooks stay as
    they were, and the next call works."""
    inputs = internvl_batch([[2, 2]], seed=9)
    ids = inputs["input_ids"][0].tolist()
    (first, _), _ = placeholder_runs(inputs["input_ids"][0], IMAGE)
    # Move 8 placeholders of the first image to the second (``</img>``, text, ``<img>`` between them).
    ids = ids[:first] + ids[first + 8 : first + 36] + [IMAGE] * 8 + ids[first + 36 :]
    ids = torch.tensor([ids])
    assert [length for _, length in placeholder_runs(ids[0], IMAGE)] == [24, 40]
    bad = {**inputs, "input_ids": ids}
    hooks = hook_ids(internvl)
    reducer = duet_vlm.make("duet", ratio=0.5)
    with torch.no_grad(), reducer(internvl):
        with pytest.raises(ValueError, match="not a whole number of InternVL tiles of 16 tokens"):
            internvl(**bad)
        after = internvl(**inputs).logits  # the reducer works on the next call
    assert hook_ids(internvl) == hooks
    with torch.no_grad(), duet_vlm.make("duet", ratio=0.5)(internvl):
        assert torch.equal(after, internvl(**inputs).logits)


def test_placeholders_and_pixel_rows_that_disagree_are_clear_errors(internvl, monkeypatch):
    """More placeholders than tiles: transformers' own check (a ValueError) speaks first. With that
    check disabled (``TRANSFORMERS_DISABLE_TORCH_CHECK=1``), extra pixel rows are the adapter's
    ValueError, naming the tiles asked for and held. The hooks stay as they were either way."""
    inputs = internvl_batch([[3]], seed=10)
    hooks = hook_ids(internvl)
    reducer = duet_vlm.make("visionzip", ratio=0.5)
    short = {**inputs, "pixel_values": inputs["pixel_values"][:2]}
    with torch.no_grad(), reducer(internvl), pytest.raises(ValueError, match="Image features and image tokens do not match"):
        internvl(**short)
    assert hook_ids(internvl) == hooks
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    extra = {**inputs, "pixel_values": torch.cat([inputs["pixel_values"], inputs["pixel_values"][:1]])}
    with torch.no_grad(), reducer(internvl):
        with pytest.raises(ValueError, match=r"ask for 3 tiles of 16 tokens \(per image: \[3\]\), but pixel_values held 4"):
            internvl(**extra)
        internvl(**inputs)
    assert hook_ids(internvl) == hooks


def test_unsupported_configs_are_refused_at_attach(internvl):
    """A decoder whose attention the language side does not recompute (GPT-OSS, with attention sinks),
    a CLS kept among the features, or several feature layers: a TypeError at attach, no hook left."""
    hooks = hook_ids(internvl)
    config = internvl.config
    cases = [
        (config.text_config, "model_type", "gpt_oss", "language models of type qwen2"),
        (config, "vision_feature_select_strategy", "full", "vision_feature_select_strategy='default'"),
        (config, "vision_feature_layer", [-1, -2], "a single layer"),
        (config, "vision_feature_layer", 0, "patch embeddings"),  # hidden_states[0]: no layer made it
        (config, "vision_feature_layer", -4, "patch embeddings"),  # the same, counted from the back
    ]
    for target, key, value, message in cases:
        before = getattr(target, key)
        setattr(target, key, value)
        try:
            with pytest.raises(TypeError, match=message):
                duet_vlm.make("duet", ratio=0.5).attach(internvl)
        finally:
            setattr(target, key, before)
        assert hook_ids(internvl) == hooks


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["duet", "vispruner", "fastv"])
def test_batch_equals_rows_and_repeated_sequences(pair, name):
    """A left-padded batch of images of 5 | 3 and 1 tiles equals each row alone (logits); sampling
    two sequences per row (``generate`` repeats the rows, the tiles are encoded once) keeps each
    image's token counts."""
    internvl, _ = pair
    inputs = internvl_batch(INTERNVL_ROWS, seed=11, suffixes=[2, 5])
    reducer = duet_vlm.make(name, ratio=0.5)
    with torch.no_grad(), reducer(internvl):
        logits = internvl(**inputs).logits
        for b in range(2):
            alone = internvl_row(inputs, INTERNVL_ROWS, b)
            valid = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(logits[b, valid], internvl(**alone).logits[0], atol=1e-4, rtol=1e-4)
        torch.manual_seed(0)
        internvl.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=2)
    items = reducer.stats.items
    assert [(i.row, i.tokens) for i in items] == [(0, 80), (1, 80), (2, 48), (2, 16), (3, 48), (3, 16)]
    for a, b in ((0, 1), (2, 4), (3, 5)):  # a row's two sequences: its items reduced alike
        assert items[a].tokens_per_layer == items[b].tokens_per_layer

