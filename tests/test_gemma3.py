"""Gemma 3: pooled SigLIP soft tokens, bidirectional image blocks and sliding windows (the invariant
matrix runs the ``gemma3`` family of tests/models.py as well).

- the vision signal is the attention SigLIP's patches receive, summed by the model's own pool;
- a vision-side method (VisionZip, dominant tokens only) equals the unpatched model fed the kept
  tokens with their ``token_type_ids``; a training step equals that ideal's loss and gradients;
- a language-side method (FastV) equals its hand-built ideal: the unpatched layers after the boundary
  fed the kept tokens with Gemma's own masks of the kept sequence (bidirectional image block, a
  window of 16 *kept* tokens, shorter than the prompt) and each layer type's RoPE;
- after pruning, the kept tokens of an image still attend to each other both ways: a change to the
  last kept image token moves the first one's output at the next layer, and nothing before the block;
- cached decoding equals uncached decoding step by step (the sliding caches of later segments hold
  the kept tokens' last W - 1); a second turn longer than the window, in one call on the reduced
  cache, equals its ideal at every position (the step's sliding masks keep the window);
- bad inputs (no ``token_type_ids``, types that do not mark the images, a cut image block, crops
  that do not match their blocks) are clear errors and leave the model as it was.
"""

from __future__ import annotations

import functools

import pytest
import torch
from checks import (
    assert_cached_equals_uncached, assert_refused_and_left_as_it_was, assert_step_equals_ideal, fastv_kept_by_hand,
    gemma_masks, kept_slots, next_slots, nudged_layer_outputs,
)
from models import BOI, GEMMA_IMAGE, GEMMA_TOKENS, GEMMA_WINDOW, gemma3_batch, make_gemma3
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

import duet_vlm
from duet_vlm.adapters import adapter_for
from duet_vlm.compat import with_cache
from duet_vlm.flops import DecoderDims, attention_pairs, layer_cache_bytes

LAYERS = 6


@functools.cache
def _models():
    model = make_gemma3(layers=LAYERS)
    referee = make_gemma3(attn="eager", layers=LAYERS)
    with torch.no_grad():
        model(**gemma3_batch([1], seed=1))
        referee(**gemma3_batch([1], seed=1))
    return model, referee


@pytest.fixture
def gemma():
    return _models()


def _entry_embeds(model, inputs) -> torch.Tensor:
    base = model.model
    ids = inputs["input_ids"]
    embeds = base.get_input_embeddings()(ids)
    features = base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    return embeds.masked_scatter((ids == GEMMA_IMAGE)[..., None], features.to(embeds.dtype))


def test_the_signal_is_the_attention_patches_receive_summed_by_the_pool(gemma):
    """From the eager referee's last-layer attention map: per patch the attention it receives (mean
    over heads, summed over queries), summed over its 2x2 pool group; the adapter's pooled scores
    equal it."""
    model, referee = gemma
    pixels = gemma3_batch([2], seed=3)["pixel_values"]
    with torch.no_grad():
        out = referee.model.vision_tower(pixel_values=pixels, output_attentions=True)
    received = out.attentions[-1].mean(dim=1).sum(dim=1)  # (images, patches)
    grid = received.view(-1, 8, 8)
    by_hand = grid.view(-1, 4, 2, 4, 2).sum(dim=(2, 4)).reshape(-1, GEMMA_TOKENS)
    adapter = adapter_for(model)
    captured = {}
    handle = adapter.towers["image"].register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model.model.vision_tower(pixel_values=pixels)
    finally:
        handle.remove()
    scores, keys = adapter.layer_scores(adapter.towers["image"], captured["x"])
    torch.testing.assert_close(scores, by_hand, rtol=1e-5, atol=1e-6)
    assert keys.shape == (2, GEMMA_TOKENS, 32 // 4)


def _dominant_only():
    return duet_vlm.make("visionzip", ratio=0.5, contextual=0)


@pytest.mark.parametrize("images", [1, 2])
def test_vision_side_method_equals_the_unpatched_model_fed_the_kept_tokens(gemma, images):
    """VisionZip (dominant tokens only) keeps half of each image's soft tokens in their slots: the
    unpatched model fed those embeddings, with their token types (so Gemma builds its own
    bidirectional, windowed masks over the kept sequence), gives the same logits at every position."""
    model, _ = gemma
    inputs = gemma3_batch([images], seed=11, suffixes=[9])
    ids = inputs["input_ids"][0]
    reducer = _dominant_only()
    with torch.no_grad(), reducer(model):
        reduced = model(**inputs).logits[0]
    keep = ids != GEMMA_IMAGE
    keep[kept_slots(reducer, ids, GEMMA_IMAGE)] = True
    kept = keep.nonzero()[:, 0]
    assert len(kept) > GEMMA_WINDOW  # the window bites
    with torch.no_grad():
        embeds = _entry_embeds(model, inputs)[:, kept]
        ideal = model(inputs_embeds=embeds, token_type_ids=inputs["token_type_ids"][:, kept],
                      attention_mask=torch.ones(1, len(kept), dtype=torch.long)).logits[0]
    torch.testing.assert_close(reduced[next_slots(kept, len(ids))], ideal, atol=1e-5, rtol=1e-5)


def test_training_step_equals_the_ideal(gemma):
    """With labels, the reduced model's loss and gradients (projector, vision tower, first and last
    decoder layers) equal those of the unpatched model run on the kept tokens."""
    model, _ = gemma
    inputs = gemma3_batch([2], seed=7)
    ids = inputs["input_ids"]
    labels = ids.masked_fill(ids == GEMMA_IMAGE, -100)
    parts = {
        "projector": model.model.multi_modal_projector.mm_input_projection_weight,
        "vision tower": model.model.vision_tower.encoder.layers[-1].mlp.fc1.weight,
        "first layer": model.model.language_model.layers[0].self_attn.q_proj.weight,
        "last layer": model.model.language_model.layers[-1].mlp.down_proj.weight,
    }
    reducer = _dominant_only()

    def ideal():
        keep = ids[0] != GEMMA_IMAGE
        keep[kept_slots(reducer, ids[0], GEMMA_IMAGE)] = True
        kept = keep.nonzero()[:, 0]
        return model(inputs_embeds=_entry_embeds(model, inputs)[:, kept], token_type_ids=inputs["token_type_ids"][:, kept],
                     attention_mask=torch.ones(1, len(kept), dtype=torch.long), labels=labels[:, kept]).loss

    assert_step_equals_ideal(model, reducer, {**inputs, "labels": labels}, parts, ideal)


def test_language_side_method_equals_the_hand_built_ideal(gemma):
    """FastV: the unpatched decoder runs layers 0..K-1 on every token; per image the tokens kept are
    the top by the last token's attention in layer K - 1's eager map (a sliding layer: the window is
    in that map); layers K.. run on the text and the kept tokens at their original positions, each
    with Gemma's mask of its type built over the kept sequence (the window counting kept tokens) and
    its type's RoPE. Logits equal at every position, and the window bites (the kept sequence is
    longer than it, and a mask with the original positions' window would differ)."""
    model, referee = gemma
    inputs = gemma3_batch([2], seed=8, suffixes=[9])
    reducer = duet_vlm.make("fastv", ratio=0.5)
    with torch.no_grad(), reducer(model):
        reduced = model(**inputs).logits[0]
    items = reducer.stats.items
    (boundary, _), = items[0].stage_ids
    ids = inputs["input_ids"][0]
    lm = referee.model.language_model
    embeds = _entry_embeds(referee, inputs)
    with torch.no_grad():
        out = referee.model(**inputs, output_attentions=True, output_hidden_states=True)
    attention = out.attentions[boundary - 1][0, :, -1].mean(dim=0)
    kept = fastv_kept_by_hand(attention, ids, GEMMA_IMAGE, items, boundary)
    assert len(kept) > GEMMA_WINDOW
    hidden = out.hidden_states[boundary][:, kept]
    positions = kept[None]
    types = inputs["token_type_ids"][:, kept]
    masks = gemma_masks(referee, hidden, types)
    gathered = gemma_masks(referee, embeds, inputs["token_type_ids"])["sliding_attention"][..., kept[:, None], kept]
    assert not torch.equal(masks["sliding_attention"], gathered)  # where the window counts differs here
    with torch.no_grad():
        for layer, kind in zip(lm.layers[boundary:], lm.config.layer_types[boundary:]):
            rope = lm.rotary_emb(hidden, positions, kind)
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=positions, position_embeddings=rope)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        ideal = referee.lm_head(lm.norm(hidden))[0]
    torch.testing.assert_close(reduced[next_slots(kept, len(ids))], ideal, atol=1e-4, rtol=1e-4)


def test_the_image_block_stays_bidirectional_after_pruning(gemma):
    """After FastV's boundary, a change to the last kept image token's state moves the first kept
    image token's output at the next layer (they attend both ways, as in the unpatched model), and
    leaves every token before the image block as it was."""
    model, _ = gemma
    inputs = gemma3_batch([1], seed=5)
    reducer = duet_vlm.make("fastv", ratio=0.5)
    start = (inputs["input_ids"][0] == BOI).nonzero()[0, 0].item() + 1
    (boundary, kept), = reducer.resolve(adapter_for(model).geometry).schedule.boundaries
    plain, nudged = nudged_layer_outputs(model, reducer, inputs, boundary, start + kept - 1)
    assert (plain[start] - nudged[start]).abs().max() > 1e-3  # the first kept image token saw the last
    torch.testing.assert_close(plain[:start], nudged[:start], rtol=0, atol=0)  # nothing before the block did


@pytest.mark.parametrize("method, beams", [("duet", 1), ("fastv", 1), ("visionzip", 1), ("duet", 2)])
def test_cached_decoding_equals_uncached_decoding(gemma, method, beams):
    """Greedy generation (and beam search, whose beams repeat each row and reorder the cache) with
    the cache (later segments' sliding caches hold the kept tokens' last W - 1, their masks built
    against them) gives the same logits at every step as generation that prefills again each step;
    the prompts are longer than the window."""
    model, _ = gemma
    inputs = gemma3_batch([1, 2], seed=9, suffixes=[7, 3])
    assert_cached_equals_uncached(model, duet_vlm.make(method, ratio=0.5), inputs, GEMMA_WINDOW + 2, beams)


# ----------------------------------------------------------------------------- bad inputs
def _cut_block(inputs):
    ids = inputs["input_ids"].clone()
    image = (ids[0] == GEMMA_IMAGE).nonzero()[:, 0]
    keep = torch.ones_like(ids[0], dtype=torch.bool)
    keep[image[-1]] = False
    return {**inputs, "input_ids": ids[:, keep], "attention_mask": inputs["attention_mask"][:, keep],
            "token_type_ids": inputs["token_type_ids"][:, keep]}


BAD = {
    "no token_type_ids": (lambda i: {k: v for k, v in i.items() if k != "token_type_ids"}, "token_type_ids"),
    "types off the images": (lambda i: {**i, "token_type_ids": torch.roll(i["token_type_ids"], 1, dims=1)},
                             "do not mark exactly the image placeholders"),
    "an image block cut short": (_cut_block, "do not match"),
    "crops without their blocks": (lambda i: {**i, "pixel_values": torch.cat([i["pixel_values"]] * 2)}, "do not match"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_clear_errors_and_leave_the_model_as_it_was(gemma, case):
    model, _ = gemma
    inputs = gemma3_batch([2], seed=4)
    make_bad, message = BAD[case]
    assert_refused_and_left_as_it_was(model, inputs, make_bad(inputs), ValueError, message)


def test_masks_fall_back_only_where_the_model_builds_none(gemma):
    """The adapter's prefill masks are the model's own: the bidirectional full-attention mask of a
    sequence with an image differs from the causal one exactly inside the image block."""
    model, _ = gemma
    inputs = gemma3_batch([1], seed=2)
    adapter = adapter_for(model)
    hidden = _entry_embeds(model, inputs)
    valid = inputs["attention_mask"].bool()
    masks = adapter.scheme.build(hidden, valid, inputs["token_type_ids"])
    causal = create_causal_mask(config=model.config.text_config, inputs_embeds=hidden, attention_mask=valid,
                                **with_cache(None), allow_is_causal_skip=False)
    differs = (masks["attention"] != causal)[0, 0]
    image = inputs["token_type_ids"][0].bool()
    assert differs.any() and bool(differs[~image].logical_not().all()) and bool(differs[:, ~image].logical_not().all())



def test_costs_count_what_gemmas_masks_allow_and_its_caches_hold(gemma):
    """On a prompt longer than the window, with two image blocks: each layer's counted query-key pairs
    (``flops.attention_pairs``: windowed in sliding layers, plus each block's later tokens) equal the
    pairs its mask allows, and each layer's counted cache bytes what its cache holds after the prefill."""
    model, _ = gemma
    inputs = gemma3_batch([2], seed=3, suffixes=[9])
    n = inputs["input_ids"].shape[1]
    assert n > GEMMA_WINDOW
    adapter = adapter_for(model)
    dims = DecoderDims.from_config(model.config.text_config)
    with torch.no_grad():
        masks = adapter.scheme.build(_entry_embeds(model, inputs), inputs["attention_mask"].bool(), inputs["token_type_ids"])
        cache = DynamicCache(config=model.config.text_config)
        model(**inputs, past_key_values=cache, use_cache=True)
    for layer, kind in enumerate(adapter.scheme.kinds):
        assert attention_pairs(dims, layer, n, [GEMMA_TOKENS] * 2) == int(masks[kind].sum()), layer
        held = cache.layers[layer].keys
        assert layer_cache_bytes(dims, layer, n, held.element_size()) == 2 * held.numel() * held.element_size(), layer


TURN = GEMMA_WINDOW + 4  # a second turn longer than the window: its own tokens leave each other's windows


def _second_turn(model, reducer, inputs, turn):
    """The prompt prefilled under ``reducer`` into a cache, then ``turn`` (text tokens) in one call
    on that cache, as a chat's next turn: the turn's logits at every position."""
    n = inputs["input_ids"].shape[1]
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad(), reducer(model):
        model(**inputs, past_key_values=cache, use_cache=True)
        out = model(input_ids=turn, attention_mask=torch.ones(1, n + turn.shape[1], dtype=torch.long),
                    position_ids=torch.arange(n, n + turn.shape[1])[None], past_key_values=cache, use_cache=True)
    return out.logits[0]


def _turn_ideal_vision(model, referee, reducer, inputs, turn):
    """The unpatched model fed the kept tokens and then the turn, in one prefill."""
    ids = inputs["input_ids"][0]
    keep = ids != GEMMA_IMAGE
    keep[kept_slots(reducer, ids, GEMMA_IMAGE)] = True
    kept = keep.nonzero()[:, 0]
    embeds = torch.cat([_entry_embeds(model, inputs)[:, kept], model.get_input_embeddings()(turn)], dim=1)
    types = torch.cat([inputs["token_type_ids"][:, kept], torch.zeros_like(turn)], dim=1)
    return model(inputs_embeds=embeds, token_type_ids=types,
                 attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long)).logits[0, len(kept):]


def _turn_ideal_language(model, referee, reducer, inputs, turn):
    """FastV's hand-built ideal (``test_language_side_method_equals_the_hand_built_ideal``) of the
    prompt and the turn in one prefill: layers 0..K-1 on every token, the tokens kept chosen by the
    prompt's last token, layers K.. on the kept tokens and the turn, with Gemma's masks of that
    sequence (the turn's windows counting kept tokens)."""
    ids = inputs["input_ids"][0]
    n = len(ids)
    items = reducer.stats.items
    (boundary, _), = items[0].stage_ids
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], turn], dim=1),
            "attention_mask": torch.ones(1, n + turn.shape[1], dtype=torch.long),
            "token_type_ids": torch.cat([inputs["token_type_ids"], torch.zeros_like(turn)], dim=1)}
    lm = referee.model.language_model
    out = referee.model(**full, output_attentions=True, output_hidden_states=True)
    attention = out.attentions[boundary - 1][0, :, n - 1, :n].mean(dim=0)
    prompt_kept = fastv_kept_by_hand(attention, ids, GEMMA_IMAGE, items, boundary)
    kept = torch.cat([prompt_kept, torch.arange(n, n + turn.shape[1])])
    hidden = out.hidden_states[boundary][:, kept]
    masks = gemma_masks(referee, hidden, full["token_type_ids"][:, kept])
    for layer, kind in zip(lm.layers[boundary:], lm.config.layer_types[boundary:]):
        hidden = layer(hidden, attention_mask=masks[kind], position_ids=kept[None],
                       position_embeddings=lm.rotary_emb(hidden, kept[None], kind))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return referee.lm_head(lm.norm(hidden))[0, -turn.shape[1]:]


@pytest.mark.parametrize("method, ideal", [("visionzip", _turn_ideal_vision), ("fastv", _turn_ideal_language)],
                         ids=["visionzip", "fastv"])
def test_a_second_turn_longer_than_the_window_equals_its_ideal(gemma, method, ideal):
    """A turn of W + 4 text tokens in one call on the reduced prompt's cache (entry-reduced:
    VisionZip, dominant tokens only; pruned at a boundary: FastV) gives at every position of the turn
    the logits of its ideal run on the kept prompt and the turn in one prefill: the step's sliding
    masks keep the window among the turn's own tokens (a token W or more after another does not see
    it), which decoding one token at a time never tests."""
    model, referee = gemma
    inputs = gemma3_batch([1], seed=12, suffixes=[4])
    turn = torch.randint(3, 900, (1, TURN), generator=torch.Generator().manual_seed(13))
    reducer = _dominant_only() if method == "visionzip" else duet_vlm.make("fastv", ratio=0.5)
    reduced = _second_turn(model, reducer, inputs, turn)
    with torch.no_grad():
        expected = ideal(model, referee, reducer, inputs, turn)
    torch.testing.assert_close(reduced, expected, atol=1e-4, rtol=1e-4)
