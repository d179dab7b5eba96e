"""HiPrune: the official code's selections replayed, its score (attention received, on a tower with a
CLS token too) against the tower's own attention, and its edges.

The invariant matrix (``test_methods_matrix.py``, ``test_invariants.py``, every family) covers it as
a registered method; this file holds what is particular to it.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import duet_vlm
from duet_vlm.methods.hiprune import first_unique, hiprune_select, object_layer_for
from duet_vlm.geometry import Geometry

from checks import hook_ids
from models import make_inputs, make_llava

#: the recorded configurations (tests/data/vectors/README.md): name -> (budget, alpha, object layer 0-based)
CONFIGS = {"192": (192, 0.1, 8), "128": (128, 0.1, 8), "64": (64, 0.1, 8), "64-a0.5-l5": (64, 0.5, 4)}
PATCHES = 576


def _expected(reference_dir, name):
    record = json.loads((reference_dir / f"hiprune-official-{name}.json").read_text())
    return record["samples"]["0"], load_file(reference_dir / f"hiprune-official-{name}.safetensors")


def _first_layer_input(model, input_ids, pixel_values, reducer):
    """The hidden states decoder layer 0 receives, and the reducer's stats, in one prefill."""
    seen = []
    with reducer(model):
        handle = model.model.language_model.layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
        try:
            with torch.no_grad():
                model(input_ids=input_ids, pixel_values=pixel_values)
        finally:
            handle.remove()
        return seen[0][0], reducer.stats


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_language_model_receives_what_the_official_code_gives_it(official, name):
    """On the model the official runs used: the kept patches, the anchors (in score order), the
    token count of every layer, and the projected tokens decoder layer 0 receives at the image's
    place (what the official ``encode_images`` hands its language model), atol 1e-4.

    Catches a CLS-row score instead of attention received (other registers), true 2-D buffers instead
    of the official raster neighbours (anchor 311 sits at the end of its row in ``64-a0.5-l5``), the
    object layer off by one, and registers that may repeat an anchor or buffer."""
    model, input_ids, pixel_values, reference_dir = official
    sample, tensors = _expected(reference_dir, name)
    budget, alpha, layer = CONFIGS[name]
    hidden, stats = _first_layer_input(model, input_ids, pixel_values, duet_vlm.make("hiprune", budget=budget, alpha=alpha, object_layer=layer))
    assert (stats.vision_kept[0] - 1).tolist() == sample["kept_patch_indices_ascending"]  # CLS first in the tower's space
    assert (stats.vision_roles["anchors"][0] - 1).tolist() == sample["anchors_in_score_order"]
    assert stats.tokens_per_layer == [budget] * 32
    assert hidden.shape[0] == 5 + budget + 12
    # The official run's tower ran eager attention (it asks for the maps), this one SDPA: ~1e-5 apart.
    torch.testing.assert_close(hidden[5 : 5 + budget], tensors["s0_visual_tokens_llm_space"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_selection_replays_on_the_official_scores(reference_dir, name):
    """The pure function on the official code's own scores gives its selection exactly; anchors and
    buffers are the recorded ones."""
    sample, tensors = _expected(reference_dir, name)
    budget, alpha, _ = CONFIGS[name]
    kept, anchors = hiprune_select(tensors["s0_object_scores"], tensors["s0_register_scores"], budget, alpha, cols=24)
    assert kept.tolist() == sample["kept_patch_indices_ascending"]
    assert anchors.tolist() == sample["anchors_in_score_order"]
    assert sorted(set(kept.tolist()) - set(sample["registers"])) == sorted(sample["anchors_and_buffers"])


def test_the_scores_are_the_attention_each_patch_receives(official):
    """``layer_scores(..., received=True)`` on a CLIP layer's captured input equals that layer's own
    eager attention probabilities (``output_attentions``), averaged over heads, summed over every
    query (CLS included), on the patches; without ``received`` it stays the CLS row."""
    model, input_ids, pixel_values, _ = official
    adapter = duet_vlm.adapter_for(model)
    tower = model.model.vision_tower
    layer = adapter.encoder_layer("image", 8)
    inputs = []
    handle = layer.register_forward_pre_hook(lambda m, a, kw: inputs.append(a[0] if a else kw["hidden_states"]), with_kwargs=True)
    eager = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attentions = tower(pixel_values, output_attentions=True).attentions[8]
    finally:
        tower.config._attn_implementation = eager
        handle.remove()
    received, _ = adapter.layer_scores(layer, inputs[0], received=True)
    cls, _ = adapter.layer_scores(layer, inputs[0])
    torch.testing.assert_close(received, attentions.mean(dim=1).sum(dim=1)[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(cls, attentions[:, :, 0, 1:].sum(dim=1), atol=1e-5, rtol=0)


def test_anchors_and_buffers_beyond_the_budget_are_cut_in_order():
    """A budget of 3 with alpha 1: one anchor and four buffers do not fit; the anchor and its left and
    right neighbours are kept (the official code fails there), and nothing is kept twice."""
    scores = torch.zeros(16)
    scores[5] = 1.0
    kept, anchors = hiprune_select(scores, torch.arange(16.0), keep=3, alpha=1.0, cols=4)
    assert kept.tolist() == [4, 5, 6] and anchors.tolist() == [5]
    # clamped neighbours at the corner collapse: anchor 0 brings 1 and 4 only; registers fill the rest
    scores = torch.zeros(16)
    scores[0] = 1.0
    kept, _ = hiprune_select(scores, torch.arange(16.0), keep=6, alpha=0.9, cols=4)
    assert kept.tolist() == [0, 1, 4, 13, 14, 15]
    assert first_unique(torch.tensor([2, 2, 0, 1, 0])).tolist() == [2, 0, 1]


def test_the_object_layer_follows_the_towers_depth():
    assert object_layer_for(Geometry(32, 576, (24, 24), True, encoder_depth=24)) == 8  # official LLaVA: the 9th
    assert object_layer_for(Geometry(32, 576, (24, 24), True, encoder_depth=27)) == 9  # SigLIP's 27: round(10.1)
    assert object_layer_for(Geometry(28, 64, (8, 8), False, rope="mrope", encoder_depth=32)) == 15  # Qwen2.5-VL
    assert object_layer_for(Geometry(28, 64, (8, 8), False, rope="mrope", encoder_depth=4)) == 1
    assert object_layer_for(Geometry(28, 64, (8, 8), False, rope="mrope", encoder_depth=27)) == 13  # round(13.5)
    assert object_layer_for(Geometry(32, 64, (8, 8), True, encoder_depth=4)) == 1  # round(1.5): the 2nd of 4
    assert object_layer_for(Geometry(32, 64, (8, 8), True, encoder_depth=2)) == 0  # never below the first


def test_the_default_object_layer_picks_the_anchors_on_a_shallow_tower():
    """On a 4-layer CLIP tower (features from layer 2, ``vision_feature_layer=-2``) HiPrune's default
    object layer is the 2nd (``round(9 * 4 / 24)``, 0-based 1): the kept patches and the anchors equal
    ``hiprune_select`` on the attention each patch receives (eager maps, mean over heads, summed over
    every query) in layer 1 (anchors; alpha 0.5: two of them) and layer 2 (registers)."""
    model = make_llava(layers=2, image_size=112, vision_layers=4, seed=3)  # 8x8 patches
    inputs = make_inputs(model, seed=2)
    tower = model.model.vision_tower
    eager = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attentions = tower(inputs["pixel_values"], output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = eager
    received = [maps.mean(dim=1).sum(dim=1)[0, 1:] for maps in attentions]
    kept, anchors = hiprune_select(received[1], received[2], 16, 0.5, cols=8)  # 2 anchors and their buffers
    assert not torch.equal(kept, hiprune_select(received[0], received[2], 16, 0.5, cols=8)[0])  # the layer matters
    reducer = duet_vlm.make("hiprune", budget=16, alpha=0.5)
    with torch.no_grad(), reducer(model):
        model(**inputs)
    assert (reducer.stats.vision_kept[0] - 1).tolist() == kept.tolist()  # CLS first in the tower's space
    assert (reducer.stats.vision_roles["anchors"][0] - 1).tolist() == anchors.tolist()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"budget": 0}, "budget must be a positive int"),
        ({"budget": 64, "alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
        ({"budget": 64, "object_layer": "middle"}, "object_layer is an encoder layer index"),
        ({"budget": 64, "object_layer": 2.5}, "object_layer is an encoder layer index"),
    ],
)
def test_bad_options_are_refused_when_built(options, message):
    with pytest.raises(ValueError, match=message):
        duet_vlm.make("hiprune", **options)


def test_a_layer_outside_the_tower_is_refused_and_leaves_the_model_as_it_was():
    """An object layer the tower does not have is refused when attached, naming it; the model's
    output and hooks are as before. (A budget at or above the tokens warns and reduces nothing, as
    for every method: the matrix tests it.)"""
    model = make_llava(layers=2, image_size=112, seed=0)  # 64 patches, a 2-layer tower
    inputs = make_inputs(model, seed=1)
    with torch.no_grad():
        reference = model(**inputs).logits
    hooks = hook_ids(model)
    with pytest.raises(ValueError, match="layer 5"):
        with duet_vlm.make("hiprune", budget=16, object_layer=5)(model), torch.no_grad():
            model(**inputs)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference, atol=0, rtol=0)
    assert hook_ids(model) == hooks
