"""What ranks DUET's Stage A (``Duet(vision_scores=...)``): the published CLS attention (on a tower without
a CLS token, the adapter's substitute) or each token's feature norm. The norm option keeps exactly the
tokens of largest norm, computed here from the model's own features, on a tower with a CLS token
(LLaVA-1.5) and on one without (Qwen2.5-VL's merged tokens); it changes nothing else of the plan."""

import pytest
import torch

import duet_vlm
from duet_vlm import Geometry
from duet_vlm.methods.stages import DominantContextualMerge

from models import FAMILIES

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)


def features_of(model, inputs) -> tuple[torch.Tensor, bool]:
    """``(what Stage A ranks, has_cls)``: the feature layer's tokens (CLS first) of a LLaVA model, a
    Qwen-VL model's merged tokens; computed with the model's own modules, no reducer attached."""
    with torch.no_grad():
        if model.config.model_type == "llava":
            hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
            return hidden[model.config.vision_feature_layer][0], True
        out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        return getattr(out, "pooler_output", out), False


@pytest.mark.parametrize("family_name", ["llava", "qwen2_5_vl"])
def test_norm_keeps_the_tokens_of_largest_feature_norm(family_name):
    family = FAMILIES[family_name]
    model = family.model()
    inputs = family.one(model)
    features, has_cls = features_of(model, inputs)
    norms = features[int(has_cls):].float().norm(dim=-1)
    for budget in (12, 8):
        reducer = duet_vlm.Duet(budget=budget, vision_scores="norm")
        with torch.no_grad(), reducer(model):
            model(**inputs)
        dominant = reducer.stats.vision_roles["dominant"][0]
        patches = dominant[1:] - 1 if has_cls else dominant  # the CLS token is kept first, as always
        if has_cls:
            assert int(dominant[0]) == 0
        expected = norms.topk(len(patches)).indices.sort().values
        assert patches.sort().values.tolist() == expected.tolist()
        published = duet_vlm.Duet(budget=budget)
        with torch.no_grad(), published(model):
            model(**inputs)
        assert reducer.stats.tokens_per_layer == published.stats.tokens_per_layer
        # the published rule ranks by attention: another set of dominant tokens on these random weights
        assert published.stats.vision_roles["dominant"][0].tolist() != dominant.tolist()


def test_the_option_changes_only_the_vision_stage_s_score_and_is_recorded():
    norm, published = (duet_vlm.make("duet", budget=128, **options).resolve(LLAVA15)
                       for options in ({"vision_scores": "norm"}, {}))
    assert norm.schedule == published.schedule
    assert norm.vision.score == "norm" and published.vision.score == "attention"
    assert (norm.vision.contextual, norm.vision.cluster_width) == (published.vision.contextual, published.vision.cluster_width)
    reducer = duet_vlm.Duet(budget=64, vision_scores="norm")
    assert reducer.to_dict()["vision_scores"] == "norm"
    assert duet_vlm.from_dict(reducer.to_dict()) == reducer


@pytest.mark.parametrize("build", [lambda: duet_vlm.Duet(budget=64, vision_scores="cls"),
                                   lambda: DominantContextualMerge(score="entropy")])
def test_an_unknown_score_is_refused_when_built(build):
    with pytest.raises(ValueError, match="Stage A's score must be one of attention, norm"):
        build()
