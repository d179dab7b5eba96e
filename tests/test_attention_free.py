"""DUET with a Stage B that reads no attention weights (``Duet(scores="states")``,
``TextGuidedStates``): its score equals the definition computed naively, it passes every check of
``duet-vlm check`` on every family (the ideal, padded batches, counts, generation modes), it reads
no layer's attention, and it keeps the published Stage B's schedule."""

import pytest
import torch

import duet_vlm
from duet_vlm import Geometry
from duet_vlm.check import check_model
from duet_vlm.methods.duet import TextGuidedPrune, TextGuidedStates

from checks import assert_check_passes, release_needed
from models import FAMILIES, make_inputs, make_llava

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)


def naive_scores(states, visual, queries):
    """Per visual token, the mean over the query tokens of the cosine similarity of their states,
    in plain Python and float64."""
    rows = states.double().tolist()

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    return [sum(cosine(rows[v], rows[q]) for q in queries) / len(queries) for v in visual]


class _Recording(TextGuidedStates):
    def score(self, view):
        scores = super().score(view)
        self.log.append((view.hidden_states[0].detach().clone(), view.visual_index[0, 0].tolist(),
                         self.queries(view)[0].tolist(), scores[0, 0].detach().clone()))
        return scores


@pytest.mark.parametrize("query", ["text", "last"])
def test_the_score_is_the_texts_mean_cosine_similarity(query, monkeypatch):
    """Each visual token's score is its cosine similarity to each query token's state in the
    residual stream entering the boundary layer, averaged over the queries (float64 reference)."""
    log = []
    monkeypatch.setattr(duet_vlm.Duet, "language_stage", lambda self: _Recording(query=self.query))
    monkeypatch.setattr(_Recording, "log", log, raising=False)
    model = make_llava(layers=4, seed=1)
    inputs = make_inputs(model, seed=3)
    reducer = duet_vlm.Duet(budget=100, scores="states", query=query, layers=(2, 3), ratios=(0.5, 0.25))
    with torch.no_grad(), reducer(model):
        model(**inputs)
    assert [len(visual) for _, visual, _, _ in log] == [reducer.stats.tokens_per_layer[1], reducer.stats.tokens_per_layer[2]]
    for states, visual, queries, scores in log:
        assert (len(queries) == 1) == (query == "last")
        assert scores.tolist() == pytest.approx(naive_scores(states, visual, queries), abs=1e-5)


def test_the_option_keeps_the_published_schedule_and_reads_no_attention():
    published, states = (duet_vlm.make("duet", budget=128, **options).resolve(LLAVA15) for options in ({}, {"scores": "states"}))
    assert states.schedule == published.schedule and type(states.vision) is type(published.vision)
    assert type(published.language) is TextGuidedPrune and published.language.reads == "layer"
    assert type(states.language) is TextGuidedStates and states.language.reads is None
    assert duet_vlm.from_dict(duet_vlm.make("duet", budget=64, scores="states").to_dict()).scores == "states"
    with pytest.raises(ValueError, match="scores must be 'attention' .* or 'states', got 'keys'"):
        duet_vlm.make("duet", budget=64, scores="keys")


def test_no_layers_attention_is_computed_at_a_boundary(monkeypatch):
    """Under the option the boundaries compute no queries, keys or attention of any layer (the
    scheme's scoring and key functions are never called), where the published Stage B calls them."""
    from duet_vlm.adapters import scheme as schemes

    called = []
    for name in ("text_to_visual_attention", "layer_keys"):
        known = getattr(schemes.LayerScheme, name)
        monkeypatch.setattr(schemes.LayerScheme, name,
                            lambda self, *args, _known=known, _name=name, **kwargs: called.append(_name) or _known(self, *args, **kwargs))
    model = make_llava(layers=4, seed=1)
    inputs = make_inputs(model, seed=3)
    for scores in ("states", "attention"):
        called.clear()
        with torch.no_grad(), duet_vlm.Duet(budget=100, scores=scores, layers=(2, 3), ratios=(0.5, 0.25))(model):
            model(**inputs)
        assert bool(called) == (scores == "attention"), (scores, called)


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_every_check_passes_on_every_family(family_name):
    """``duet-vlm check``'s checks with the option, family by family: unreduced when nothing drops,
    the ideal (the unpatched layers fed the kept tokens), padded batch against each row alone, the
    per-layer counts against the plan, every generation mode."""
    family = FAMILIES[family_name]
    model = family.model()
    if release_needed(model) is not None:
        pytest.skip("the family needs a newer transformers")
    batch = family.batch(model)
    rows = [family.row(batch, b) for b in range(batch["input_ids"].shape[0])]
    report = check_model(model, batch, rows, "duet", ratio=0.5, rounds=1, new_tokens=3, skip=("timing",),
                         options={"scores": "states"})
    assert_check_passes(report, family_name)
