"""VisionSelector (issue #36): a learned token scorer trained by ``duet-vlm train --train selector``.

- the official ``TransformerScorer`` and differentiable ``TopK`` (``800a70f``), run with recorded
  random weights (``visionselector-official.*``): our scorer gives their scores, our soft top-k their
  weights and their gradient, and the hard selection their kept tokens; the untrained scorer starts
  at their initialisation;
- the training stage keeps every token, weighted, and records the soft-to-hard penalty; the
  inference stage keeps the scorer's top tokens;
- ``duet-vlm train --train selector`` changes only the scorer, saves it beside the model, and
  ``load_reducer`` attaches it again, selecting as it did; bad combinations are refused.
(The method joins every method matrix through tests/models.py's ``BUDGETED``, untrained.)
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import duet_vlm
from duet_vlm.methods.visionselector import SCORER_FILE, LearnedSelect, TokenScorer, soft_top_k
from duet_vlm.plan import VisionView


@pytest.fixture(scope="module")
def selector_vectors(reference_dir):
    record = json.loads((reference_dir / "visionselector-official.json").read_text())
    return record, load_file(reference_dir / "visionselector-official.safetensors")


def _scorer(record, tensors, prefix="weights.") -> TokenScorer:
    scorer = TokenScorer(record["width"], record["hidden"])
    scorer.load_state_dict({name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)})
    return scorer


def test_the_scorer_gives_the_official_scores(selector_vectors):
    record, tensors = selector_vectors
    assert record["official_run"]["commit"].startswith("800a70f")
    scores = _scorer(record, tensors)(tensors["tokens"])
    # ours multiplies each query by the mean key; the official code averages the N x N products
    torch.testing.assert_close(scores, tensors["scores"], rtol=1e-5, atol=1e-5)


def test_the_soft_top_k_and_its_gradient_are_the_officials(selector_vectors):
    record, tensors = selector_vectors
    scores = tensors["scores"].clone().requires_grad_(True)
    weights = soft_top_k(scores, record["k"])
    torch.testing.assert_close(weights, tensors["soft_mask"], rtol=0, atol=1e-6)
    (weights * tensors["upstream"]).sum().backward()
    torch.testing.assert_close(scores.grad, tensors["grad_scores"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(weights.sum(-1), torch.full((2,), float(record["k"])), atol=1e-4)


def test_the_gradient_is_the_constrained_derivative():
    """Finite differences of the soft top-k (its threshold moves to keep the sum): the custom
    backward equals them."""
    scores = torch.randn(1, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    direction = torch.randn_like(scores)
    upstream = torch.randn_like(scores)
    scores_var = scores.clone().requires_grad_(True)
    (soft_top_k(scores_var, 4) * upstream).sum().backward()
    step = 1e-6
    numeric = ((soft_top_k(scores + step * direction, 4) - soft_top_k(scores - step * direction, 4)) * upstream).sum() / (2 * step)
    assert abs(float((scores_var.grad * direction).sum()) - float(numeric)) < 1e-6


def test_the_hard_selection_keeps_the_officials_tokens(selector_vectors):
    record, tensors = selector_vectors
    scorer = _scorer(record, tensors)
    view = VisionView(tensors["tokens"], torch.zeros(2, 40), torch.zeros(2, 40, 1), (5, 8), False,
                      project=lambda f: f)
    reduction = LearnedSelect(lambda width: scorer).reduce(view, record["k"])
    assert torch.equal(reduction.kept, tensors["kept"])
    torch.testing.assert_close(reduction.projected, torch.stack([t[k] for t, k in zip(tensors["tokens"], tensors["kept"])]))


def test_the_untrained_scorer_starts_at_the_official_initialisation(selector_vectors):
    record, tensors = selector_vectors
    ours = TokenScorer(record["width"], record["hidden"])
    for name, value in ours.state_dict().items():
        official = tensors[f"init.{name}"]
        if name.endswith("bias"):
            assert not value.any() and not official.any()
        else:
            assert 0.5e-4 < float(value.std()) < 2e-4 and 0.5e-4 < float(official.std()) < 2e-4


def test_the_training_stage_keeps_every_token_weighted_and_records_the_penalty():
    torch.manual_seed(0)
    scorer = TokenScorer(8, std=0.5)
    tokens = torch.randn(1, 17, 8)  # a CLS token, then 16 patches
    penalties = []
    view = VisionView(tokens, torch.zeros(1, 16), torch.zeros(1, 17, 1), (4, 4), True, project=lambda f: 2 * f)
    reduction = LearnedSelect(lambda width: scorer, soft=5, penalties=penalties).reduce(view, 16)
    assert reduction.kept.tolist() == [list(range(1, 17))]  # every patch, the CLS token left out
    weights = reduction.projected / (2 * tokens[:, 1:])
    assert abs(float(weights[..., 0].sum()) - 5) < 1e-4 and torch.allclose(weights[..., 0], weights[..., 1])
    (penalty,) = penalties
    assert penalty.requires_grad and float(penalty) > 0
    penalty.backward()
    assert scorer.q_proj.weight.grad is not None


# ----------------------------------------------------------------------------- training
def _train(model_dir, output, **options):
    from duet_vlm.training import TrainConfig, train

    config = dict(model=str(model_dir), data="synthetic", output_dir=str(output), method="visionselector", budget=64,
                  train="selector", max_steps=2, batch_size=2, synthetic_items=4, learning_rate=1e-2, save_steps=100)
    return train(TrainConfig(**{**config, **options}))


def test_training_changes_only_the_scorer_and_the_saved_model_attaches_it(tiny_demo_model, tmp_path):
    from transformers import AutoModelForImageTextToText

    from duet_vlm.training.trainer import parameter_digest

    before = AutoModelForImageTextToText.from_pretrained(tiny_demo_model)
    outcome = _train(tiny_demo_model, tmp_path / "run")
    after = AutoModelForImageTextToText.from_pretrained(tmp_path / "run")
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name  # the model stayed frozen
    assert (tmp_path / "run" / SCORER_FILE).is_file()
    reducer = duet_vlm.load_reducer(tmp_path / "run")
    assert isinstance(reducer, duet_vlm.VisionSelector) and reducer.budget == 64 and reducer.scorer is not None
    assert outcome.replica_digests == [parameter_digest(reducer.scorer.requires_grad_(True))]
    untrained = TokenScorer(reducer.scorer.width)
    assert float((reducer.scorer.q_proj.weight - untrained.q_proj.weight).abs().max()) > 1e-3  # it moved

    # The saved reducer selects with the saved scorer: the tokens it keeps are its scorer's top 64
    # of the projected patches.
    from PIL import Image
    from transformers import AutoProcessor

    from duet_vlm.evaluation import chat_prompt

    processor = AutoProcessor.from_pretrained(tmp_path / "run")
    inputs = processor(text=chat_prompt(processor, "What colour is the square?"),
                       images=Image.new("RGB", (64, 48), "teal"), return_tensors="pt")
    with torch.no_grad(), reducer(after):
        after(**inputs)
    features = after.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    features = features[0] if isinstance(features, (list, tuple)) else features
    with torch.no_grad():
        expected = reducer.scorer(features.reshape(1, -1, features.shape[-1])).topk(64).indices.sort().values
    assert torch.equal(reducer.stats.vision_kept.cpu() - 1, expected)  # vision indices count the CLS token


@pytest.mark.parametrize("options, message", [
    (dict(method="duet"), "--train selector trains the token scorer of --method visionselector, not of duet"),
    (dict(adaptive="rank"), "--train selector trains at a fixed --budget"),
])
def test_bad_combinations_are_refused(tmp_path, options, message):
    from duet_vlm.training import TrainConfig

    config = dict(model="-", data="synthetic", output_dir=str(tmp_path), method="visionselector", budget=64, train="selector")
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**config, **options})


def test_the_record_rebuilds_the_reducer_with_its_scorer(tmp_path):
    scorer = TokenScorer(8, std=0.3)
    reducer = duet_vlm.VisionSelector(budget=32, scorer=scorer)
    duet_vlm.save_reducer(reducer, tmp_path)
    loaded = duet_vlm.load_reducer(tmp_path)
    assert loaded == reducer and "scorer" not in reducer.to_dict()
    for name, value in scorer.state_dict().items():
        assert torch.equal(loaded.scorer.state_dict()[name], value)


def test_eval_reads_a_trained_scorer_from_method_files_and_keys_its_rows_by_it(tiny_demo_model, tmp_path, monkeypatch):
    """``duet-vlm eval --method-files DIR`` attaches the scorer saved there; a row saved with one
    scorer is not reused for another."""
    from duet_vlm.demo import sweep

    seen = []
    original = duet_vlm.VisionSelector.load_objects.__func__

    def spy(cls, directory):
        objects = original(cls, directory)
        seen.append(objects.get("scorer"))
        return objects

    monkeypatch.setattr(duet_vlm.VisionSelector, "load_objects", classmethod(spy))
    files = tmp_path / "files"
    files.mkdir()
    digests = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        duet_vlm.save_reducer(duet_vlm.VisionSelector(budget=64, scorer=TokenScorer(32, std=0.3)), files)
        sweep.evaluate_methods(["visionselector"], (64,), n=7, model_path=tiny_demo_model, output_dir=tmp_path / "eval",
                               batch_size=7, control=False, method_files=files)
        digests.append(json.loads((tmp_path / "eval" / "rows" / "visionselector-64.json").read_text())["key"]["method_files_sha256"])
    assert seen[-1] is not None and torch.equal(seen[-1].q_proj.weight, duet_vlm.load_reducer(files).scorer.q_proj.weight)
    assert digests[0] != digests[1] and None not in digests


def test_a_resumed_run_continues_from_the_checkpoints_scorer(tiny_demo_model, tmp_path):
    """Every checkpoint carries the scorer, and resuming loads it: resumed at its last step (nothing
    left to train), the run saves exactly the checkpoint's scorer, not a fresh one."""
    _train(tiny_demo_model, tmp_path / "run", max_steps=2, save_steps=1)
    checkpoint = duet_vlm.load_reducer(tmp_path / "run" / "checkpoint-2").scorer.state_dict()
    (tmp_path / "run" / SCORER_FILE).unlink()
    _train(tiny_demo_model, tmp_path / "run", max_steps=2, save_steps=1, resume_from_checkpoint="last")
    resumed = duet_vlm.load_reducer(tmp_path / "run").scorer.state_dict()
    for name, value in checkpoint.items():
        assert torch.equal(resumed[name], value), name
    assert float(checkpoint["q_proj.weight"].abs().max()) > 1e-3  # a trained scorer, not the initialisation
