"""Gemma 4: variable-resolution images, per-layer inputs, KV-shared layers, bidirectional image
blocks in the sliding layers (the invariant matrix runs the ``gemma4`` family of tests/models.py).

- the vision signal is the attention the tower's patches receive (padding patches excluded),
  summed over each soft token's 3x3 patches by the tower's own pooling;
- a vision-side method (VisionZip, dominant tokens only) equals the unpatched model fed the kept
  tokens with their per-layer inputs and ``mm_token_type_ids``; a training step equals that ideal's
  loss and gradients;
- a language-side method (FastV) equals its hand-built ideal: the unpatched layers after the
  boundary fed the kept tokens with Gemma's masks of the kept sequence, each layer type's RoPE, each
  layer's per-layer input of the kept tokens, and the keys and values the storing layers share;
- boundaries stop at the first layer that stores keys and values for sharing: methods' defaults
  snap there, and an explicit boundary past it is refused with the boundaries that work; without KV
  sharing they go deeper;
- after pruning, the kept tokens of an image still attend to each other both ways in a sliding
  layer, and only causally in a global one (Gemma 4's masks);
- cached decoding equals uncached decoding step by step (``generate`` passes the KV-shared layers
  only the prompt's last token); a second turn longer than the window, in one call on the reduced
  cache, equals its ideal at every position (entry-reduced and pruned at a boundary);
- PIO's boundary probe runs the layer before the boundary with that layer's per-layer input: its
  choice and logits equal the hand-built ones;
- bad inputs (no ``mm_token_type_ids``, types off the images, a cut image, images that do not match
  their runs, a video) are clear errors and leave the model as it was.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from checks import (
    assert_cached_equals_uncached, assert_refused_and_left_as_it_was, assert_step_equals_ideal, fastv_kept_by_hand,
    gemma_masks, hook_ids, kept_slots, next_slots, nudged_layer_outputs, placeholder_runs,
)
from models import GEMMA4_IMAGE, GEMMA4_KERNEL, GEMMA4_VIDEO, GEMMA_WINDOW, gemma4_batch, make_gemma4
from transformers import DynamicCache

import duet_vlm
from duet_vlm import compat
from duet_vlm.adapters import adapter_for
from duet_vlm.methods.pio import saliency_nms
from duet_vlm.plan import LayerKindError

LAYERS = 6


@functools.cache
def _models(kv_shared: int = 2):
    model = make_gemma4(layers=LAYERS, kv_shared=kv_shared)
    referee = make_gemma4(attn="eager", layers=LAYERS, kv_shared=kv_shared)
    with torch.no_grad():
        model(**gemma4_batch([[(4, 4)]], seed=1))
        referee(**gemma4_batch([[(4, 4)]], seed=1))
    return model, referee


@pytest.fixture
def gemma4():
    return _models()


def _entry(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The language model's input as the unpatched model builds it: the embeddings with the images'
    soft tokens in their slots, and the per-layer inputs' token part (image slots read as padding)."""
    base = model.model
    ids = inputs["input_ids"]
    image = ids == GEMMA4_IMAGE
    text_ids = ids.masked_fill(image, model.config.text_config.pad_token_id)
    embeds = base.get_input_embeddings()(text_ids)
    features = base.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
    embeds = embeds.masked_scatter(image[..., None], torch.cat(features).to(embeds.dtype))
    return embeds, base.language_model.get_per_layer_inputs(text_ids, None)


def _fed(model, inputs, kept, **extra):
    """The unpatched model fed the tokens at ``kept`` of row 0 (their embeddings, per-layer inputs
    and token types)."""
    embeds, per_layer = _entry(model, inputs)
    return model(inputs_embeds=embeds[:, kept], per_layer_inputs=per_layer[:, kept],
                 mm_token_type_ids=inputs["mm_token_type_ids"][:, kept],
                 attention_mask=torch.ones(1, len(kept), dtype=torch.long), **extra)


def test_the_signal_is_the_attention_patches_receive_summed_by_the_pool(gemma4):
    """From the eager referee's last-layer attention map, for a 4x4- and a 2x4-token image (the
    second padded): per patch the attention it receives from the image's own patches (mean over
    heads), summed over its 3x3 cell; the adapter's pooled scores equal it on each image's cells."""
    model, referee = gemma4
    inputs = gemma4_batch([[(4, 4), (2, 4)]], seed=3)
    pixels, positions = inputs["pixel_values"], inputs["image_position_ids"]
    with torch.no_grad():
        out = referee.model.vision_tower(pixel_values=pixels, pixel_position_ids=positions, output_attentions=True)
    valid = (positions != -1).all(-1)
    attention = out.attentions[-1].mean(dim=1) * valid[:, :, None]  # (images, queries, keys)
    received = attention.sum(dim=1)
    adapter = adapter_for(model)
    reducer = duet_vlm.make("visionzip", budget=4)
    captured = {}
    handle = adapter.towers["image"].register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(x=args[0] if args else kwargs["hidden_states"], kw=kwargs),
        with_kwargs=True,
    )
    try:
        with torch.no_grad(), reducer(model):
            model(**inputs)
    finally:
        handle.remove()
    scores, keys = adapter.captured_layer_scores(adapter.towers["image"], captured["x"], [{"layer_kwargs": captured["kw"]}])
    k = GEMMA4_KERNEL
    for image, (rows, cols) in enumerate([(4, 4), (2, 4)]):
        n = valid[image].sum()
        grid = received[image, :n].view(rows * k, cols * k)
        by_hand = grid.view(rows, k, cols, k).sum(dim=(1, 3)).reshape(-1)
        torch.testing.assert_close(scores[image, : rows * cols], by_hand, rtol=1e-5, atol=1e-6)
    assert keys.shape == (2, 16, 8)


def test_padding_patches_are_neither_keys_nor_queries_wherever_they_sit():
    """The scores of an image whose padding comes last (computed on its own patches) equal those of
    the same patches with the padding first (computed over all of them, the padding masked), and the
    padding receives nothing."""
    from duet_vlm.adapters.gemma4 import received

    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(2, 1, 2, 10, 4, generator=generator)
    valid = torch.tensor([[True] * 7 + [False] * 3])
    last = received(queries, keys, 0.5, valid)
    order = torch.arange(10).roll(3)  # the three padding patches first
    first = received(queries[:, :, order], keys[:, :, order], 0.5, valid[:, order])
    torch.testing.assert_close(first[:, order.argsort()], last)
    assert last[0, 7:].eq(0).all() and abs(float(last.sum()) - 7) < 1e-5  # 7 queries, each a distribution


def _dominant_only():
    return duet_vlm.make("visionzip", ratio=0.5, contextual=0)


@pytest.mark.parametrize("grids", [[(4, 4)], [(3, 4), (2, 4)]])
def test_vision_side_method_equals_the_unpatched_model_fed_the_kept_tokens(gemma4, grids):
    """VisionZip (dominant tokens only) keeps half of each image's soft tokens in their slots: the
    unpatched model fed those embeddings with their per-layer inputs and token types (so Gemma builds
    its own masks over the kept sequence) gives the same logits at every position."""
    model, _ = gemma4
    inputs = gemma4_batch([grids], seed=11, suffixes=[9])
    ids = inputs["input_ids"][0]
    reducer = _dominant_only()
    with torch.no_grad(), reducer(model):
        reduced = model(**inputs).logits[0]
    keep = ids != GEMMA4_IMAGE
    keep[kept_slots(reducer, ids, GEMMA4_IMAGE)] = True
    kept = keep.nonzero()[:, 0]
    assert len(kept) > GEMMA_WINDOW  # the window bites
    with torch.no_grad():
        ideal = _fed(model, inputs, kept).logits[0]
    torch.testing.assert_close(reduced[next_slots(kept, len(ids))], ideal, atol=1e-5, rtol=1e-5)


def test_training_step_equals_the_ideal(gemma4):
    """With labels, the reduced model's loss and gradients (the image embedder, the vision tower,
    the per-layer projection, first and last decoder layers) equal those of the unpatched model run
    on the kept tokens."""
    model, _ = gemma4
    inputs = gemma4_batch([[(4, 4), (3, 4)]], seed=7)
    ids = inputs["input_ids"]
    labels = ids.masked_fill(ids == GEMMA4_IMAGE, -100)
    lm = model.model.language_model
    parts = {
        "embedder": model.model.embed_vision.embedding_projection.weight,
        "vision tower": model.model.vision_tower.encoder.layers[-1].mlp.up_proj.linear.weight,
        "per-layer projection": lm.per_layer_model_projection.weight,
        "first layer": lm.layers[0].self_attn.q_proj.weight,
        "last layer": lm.layers[-1].mlp.down_proj.weight,
    }
    reducer = _dominant_only()

    def ideal():
        keep = ids[0] != GEMMA4_IMAGE
        keep[kept_slots(reducer, ids[0], GEMMA4_IMAGE)] = True
        kept = keep.nonzero()[:, 0]
        return _fed(model, inputs, kept, labels=labels[:, kept]).loss

    assert_step_equals_ideal(model, reducer, {**inputs, "labels": labels}, parts, ideal)


@pytest.mark.parametrize("kv_shared", [2, 0])
def test_language_side_method_equals_the_hand_built_ideal(kv_shared):
    """FastV: the unpatched decoder runs layers 0..K-1 on every token; per image the tokens kept are
    the top by the last token's attention in layer K - 1's eager map; layers K.. run on the text and
    the kept tokens at their original positions, each with Gemma 4's mask of its type over the kept
    sequence, its type's RoPE, its per-layer input of the kept tokens, and (KV sharing) the keys and
    values the storing layers leave for the reusing ones. Logits equal at every position; with KV
    sharing FastV's default layer 2 is the deepest boundary allowed, without it layer 3 is taken."""
    model, referee = _models(kv_shared)
    layer = 2 if kv_shared else 3
    inputs = gemma4_batch([[(4, 4), (3, 4)]], seed=8, suffixes=[9])
    reducer = duet_vlm.make("fastv", ratio=0.5, layer=layer)
    with torch.no_grad(), reducer(model):
        reduced = model(**inputs).logits[0]
    items = reducer.stats.items
    (boundary, _), = items[0].stage_ids
    assert boundary == layer
    ids = inputs["input_ids"][0]
    lm = referee.model.language_model
    embeds, per_layer = _entry(referee, inputs)
    with torch.no_grad():
        out = referee.model(**inputs, output_attentions=True, output_hidden_states=True)
        projected = lm.project_per_layer_inputs(embeds, per_layer)
    attention = out.attentions[boundary - 1][0, :, -1].mean(dim=0)
    kept = fastv_kept_by_hand(attention, ids, GEMMA4_IMAGE, items, boundary)
    assert len(kept) > GEMMA_WINDOW
    shared: dict = {}
    ideal = _layers_after_the_boundary(referee, inputs, out, projected, kept, boundary, shared)
    # the storing layers left keys for the reusing ones (transformers 5.24 stores them without sharing too)
    assert bool(shared) or not kv_shared
    torch.testing.assert_close(reduced[next_slots(kept, len(ids))], ideal, atol=1e-4, rtol=1e-4)


def _layers_after_the_boundary(referee, inputs, out, projected, kept, boundary, shared=None, renumbered=False):
    """The unpatched layers ``boundary``.. of ``referee`` run on the tokens at ``kept`` of row 0 (from
    ``out``'s hidden states) at their original positions (``renumbered``: at 0, 1, ...), each with
    Gemma 4's mask of its type over the kept sequence, its type's RoPE, its per-layer input of the
    kept tokens (``projected``) and the keys and values the storing layers leave in ``shared``: the
    logits at every kept token."""
    lm = referee.model.language_model
    hidden = out.hidden_states[boundary][:, kept]
    positions = torch.arange(len(kept))[None] if renumbered else kept[None]
    masks = gemma_masks(referee, hidden, inputs["mm_token_type_ids"][:, kept])
    shared = {} if shared is None else shared
    with torch.no_grad():
        for index in range(boundary, LAYERS):
            kind = lm.config.layer_types[index]
            rope = lm.rotary_emb(hidden, positions, kind)
            hidden = lm.layers[index](hidden, projected[:, kept, index], shared_kv_states=shared,
                                      attention_mask=masks[kind], position_ids=positions, position_embeddings=rope)
        return referee.lm_head(lm.norm(hidden))[0]


def test_pio_with_the_boundary_probe_equals_the_hand_built_ideal(gemma4):
    """PIO (no vision scan, 4 tokens kept at layer 2) with ``probe="boundary"``: the probe runs layer
    1 once more on its own output, with layer 1's mask, RoPE and per-layer input (kept for the layer
    *before* the boundary); the proxy loss is the cross-entropy of the LM head's logits at the 4
    positions before the last token against their argmax, and saliency-NMS on its gradient chooses.
    The kept tokens equal that choice made by hand on the eager referee (the image sits inside
    layer 1's window of the proxy positions: its saliencies are not all zero), and the logits at
    every position equal the unpatched layers 2.. run on the kept tokens, renumbered (as PIO numbers
    them after a drop)."""
    model, referee = gemma4
    keep_count = 4
    inputs = gemma4_batch([[(3, 4)]], seed=8, suffixes=[4])
    reducer = duet_vlm.make("pio", vision=False, layers=(2,), keep=(keep_count,), probe="boundary")
    with torch.no_grad(), reducer(model):
        reduced = model(**inputs).logits[0]
    (item,) = reducer.stats.items
    (boundary, chosen), = item.stage_ids
    assert boundary == 2
    ids = inputs["input_ids"][0]
    n = len(ids)
    lm = referee.model.language_model
    embeds, per_layer = _entry(referee, inputs)
    with torch.no_grad():
        out = referee.model(**inputs, output_hidden_states=True)
        projected = lm.project_per_layer_inputs(embeds, per_layer)
    probe = out.hidden_states[boundary].detach().requires_grad_()
    kind = lm.config.layer_types[boundary - 1]
    positions = torch.arange(n)[None]
    with torch.enable_grad():
        y = lm.layers[boundary - 1](
            probe, projected[:, :, boundary - 1], shared_kv_states=compat.shared_kv_store(),
            attention_mask=gemma_masks(referee, embeds, inputs["mm_token_type_ids"])[kind], position_ids=positions,
            position_embeddings=lm.rotary_emb(probe, positions, kind),
        )
        logits = referee.lm_head(lm.norm(y[0, n - 5 : n - 1])).float()
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(dim=-1)), probe)
    (start, length), = placeholder_runs(ids, GEMMA4_IMAGE)
    saliency = grad[0, start : start + length].norm(dim=-1)
    assert bool((saliency > 0).all())
    by_hand = saliency_nms(saliency, out.hidden_states[boundary][0, start : start + length], keep_count)
    assert chosen.tolist() == by_hand.tolist()
    keep = ids != GEMMA4_IMAGE
    keep[start + by_hand] = True
    kept = keep.nonzero()[:, 0]
    ideal = _layers_after_the_boundary(referee, inputs, out, projected, kept, boundary, renumbered=True)
    torch.testing.assert_close(reduced[next_slots(kept, n)], ideal, atol=1e-4, rtol=1e-4)


def test_boundaries_stop_before_the_layers_that_share_keys_and_values(gemma4):
    """Layers 2 and 3 store keys and values that layers 4 and 5 reuse: the geometry's last boundary
    is 2, a method's default boundaries snap to it (PyramidDrop's three merge into those that fit;
    FastV's default ``layer`` snaps, as on a hybrid model), and explicit boundaries past it (DUET's
    ``layers``, FastV's ``layer``) are refused at attach, naming the boundaries that work."""
    model, _ = gemma4
    adapter = adapter_for(model)
    # transformers 5.23 and later pass the sharing layers (4 and 5) only the rows logits_to_keep asks for
    cut = 4 if compat.GEMMA4_CUTS_SHARED_QUERIES else None
    assert (adapter.geometry.last_boundary, adapter.scheme.queries_cut_from) == (2, cut)
    assert adapter_for(_models(0)[0]).geometry.last_boundary is None
    plan = duet_vlm.make("pyramiddrop", budget=8).resolve(adapter.image_geometry(4, 4))
    assert [layer for layer, _ in plan.schedule.boundaries] and max(layer for layer, _ in plan.schedule.boundaries) <= 2
    fastv = duet_vlm.make("fastv", ratio=0.5).resolve(adapter.geometry)  # FastV's default layer snaps, as on Qwen3.5
    assert [layer for layer, _ in fastv.schedule.boundaries] == [2]
    hooks = hook_ids(model)
    with pytest.raises(LayerKindError, match=r"layer\(s\) \[4\].*KV sharing.*boundaries that work: \[1, 2\]"):
        duet_vlm.make("fastv", ratio=0.5, layer=4).attach(model)  # an explicit one is never moved
    with pytest.raises(LayerKindError, match=r"KV sharing.*boundaries that work: \[1, 2\]"):
        duet_vlm.make("duet", ratio=0.5, layers=(1, 4), ratios=(0.5, 0.5)).attach(model)
    assert hook_ids(model) == hooks


KEPT = 4  # FastV at layer 2 keeps 4 of an image's 16 soft tokens in the tests below


@pytest.mark.parametrize("layer_index, both_ways", [(3, True), (2, False)])
def test_the_image_block_stays_bidirectional_after_pruning_where_gemma_4_has_it(gemma4, layer_index, both_ways):
    """After FastV's boundary at layer 2, a change to the last kept image token's state moves the
    first kept image token's output in sliding layer 3 (they attend both ways there, as in the
    unpatched model) and not in global layer 2 (causal, as Gemma 4's global layers are); tokens
    before the image block never move."""
    model, _ = gemma4
    inputs = gemma4_batch([[(4, 4)]], seed=5)
    start = (inputs["input_ids"][0] == GEMMA4_IMAGE).nonzero()[0, 0].item()
    reducer = duet_vlm.make("fastv", layer=2, keep=KEPT)
    plain, nudged = nudged_layer_outputs(model, reducer, inputs, layer_index, start + KEPT - 1)
    moved = (plain[start] - nudged[start]).abs().max() > 1e-3
    assert bool(moved) == both_ways
    torch.testing.assert_close(plain[:start], nudged[:start], rtol=0, atol=0)


@pytest.mark.parametrize("method, beams", [("duet", 1), ("fastv", 1), ("visionzip", 1), ("duet", 2)])
def test_cached_decoding_equals_uncached_decoding(gemma4, method, beams):
    """Greedy generation (and beam search) with the cache, whose prefill passes the KV-shared layers
    only the prompt's last token, gives the same logits at every step as generation that prefills
    again each step; the prompts are longer than the window."""
    model, _ = gemma4
    inputs = gemma4_batch([[(4, 4)], [(3, 4), (2, 4)]], seed=9, suffixes=[7, 3])
    assert_cached_equals_uncached(model, duet_vlm.make(method, ratio=0.5), inputs, GEMMA_WINDOW + 2, beams)


def test_a_video_runs_unpatched_under_full_and_is_refused_under_a_method(gemma4):
    """Gemma 4's videos are not reduced: under ``full`` a prompt with a video gives the unpatched
    model's logits (the reducer steps aside), under a method it is refused (``bad inputs`` below)."""
    model, _ = gemma4
    inputs = _with_video(gemma4_batch([[(4, 4)]], seed=4))
    with torch.no_grad():
        plain = model(**inputs).logits
        with duet_vlm.make("full")(model):
            under_full = model(**inputs).logits
    torch.testing.assert_close(under_full, plain, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad inputs
def _cut_image(inputs):
    ids = inputs["input_ids"].clone()
    image = (ids[0] == GEMMA4_IMAGE).nonzero()[:, 0]
    keep = torch.ones_like(ids[0], dtype=torch.bool)
    keep[image[-1]] = False
    return {**inputs, "input_ids": ids[:, keep], "attention_mask": inputs["attention_mask"][:, keep],
            "mm_token_type_ids": inputs["mm_token_type_ids"][:, keep]}


def _with_video(inputs):
    ids = inputs["input_ids"].clone()
    ids[0, 1] = GEMMA4_VIDEO
    return {**inputs, "input_ids": ids}


BAD = {
    "no mm_token_type_ids": (lambda i: {k: v for k, v in i.items() if k != "mm_token_type_ids"}, ValueError,
                             "mm_token_type_ids"),
    "types off the images": (lambda i: {**i, "mm_token_type_ids": torch.roll(i["mm_token_type_ids"], 1, dims=1)},
                             ValueError, "do not mark exactly the image placeholders"),
    # transformers' own check (soft tokens against placeholders) runs before the language model's entry
    "an image cut short": (_cut_image, ValueError, "do not match"),
    "images without their runs": (lambda i: {**i, "pixel_values": torch.cat([i["pixel_values"]] * 3),
                                             "image_position_ids": torch.cat([i["image_position_ids"]] * 3)},
                                  ValueError, "do not match"),
    # as many soft tokens as placeholders, but each run is not its image's: only the adapter sees it
    "images out of order": (lambda i: {**i, "pixel_values": i["pixel_values"].flip(0),
                                       "image_position_ids": i["image_position_ids"].flip(0)},
                            ValueError, r"a run of 16 image placeholders in row 0, but its image has 3x4"),
    "a video": (_with_video, NotImplementedError, "videos"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_clear_errors_and_leave_the_model_as_it_was(gemma4, case):
    model, _ = gemma4
    inputs = gemma4_batch([[(4, 4), (3, 4)]], seed=4)
    make_bad, error, message = BAD[case]
    assert_refused_and_left_as_it_was(model, inputs, make_bad(inputs), error, message)


def test_costs_count_what_gemma_4_computes_and_caches(gemma4):
    """On a prompt longer than the window, with two images: each layer's counted query-key pairs
    equal the pairs its mask allows (image blocks only in sliding layers), each layer's counted cache
    bytes what its cache holds after the prefill (nothing in the KV-shared layers; the global layers'
    wider heads), and each layer's counted projection FLOPs its own weights' (no key or value
    projection where it reuses them)."""
    from transformers import DynamicCache

    from duet_vlm.flops import DecoderDims, attention_pairs, layer_cache_bytes, layer_flops

    model, _ = gemma4
    inputs = gemma4_batch([[(4, 4), (3, 4)]], seed=3, suffixes=[9])
    n = inputs["input_ids"].shape[1]
    assert n > GEMMA_WINDOW
    adapter = adapter_for(model)
    dims = DecoderDims.from_config(model.config.text_config)
    embeds, _ = _entry(model, inputs)
    with torch.no_grad():
        masks = adapter.scheme.build(embeds, inputs["attention_mask"].bool(), inputs["mm_token_type_ids"])
        cache = DynamicCache(config=model.config.text_config)
        model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=0)
    for layer, (kind, module) in enumerate(zip(adapter.scheme.kinds, adapter.layers)):
        mask = masks[kind]  # None: sdpa's causal mask (no padding, no blocks: a global layer)
        allowed = n * (n + 1) // 2 if mask is None else int(mask.sum())
        assert attention_pairs(dims, layer, n, [16, 12]) == allowed, layer
        if module.self_attn.is_kv_shared_layer:
            assert layer_cache_bytes(dims, layer, n, 4) == 0
        else:
            held = cache.layers[layer].keys
            assert layer_cache_bytes(dims, layer, n, 4) == 2 * held.numel() * held.element_size(), layer
        # Matrix weights a token passes through (2 FLOPs per weight per token), the attention products aside.
        weights = sum(p.numel() for name, p in module.named_parameters() if p.dim() == 2)
        weights += model.model.language_model.per_layer_model_projection.weight.numel() // LAYERS
        attention = 2 * 2 * dims.heads * module.self_attn.head_dim * attention_pairs(dims, layer, n, [16, 12])
        assert layer_flops(dims, layer, n, [16, 12]) - attention == 2 * n * weights, layer


def test_the_towers_counted_flops_are_its_weights_and_its_attention(gemma4):
    """``flops.encoder_flops`` (what ``plan --ladder`` counts per rung) on the tiny tower: two FLOPs
    per weight of its layers per patch, plus the score and value products over every pair of the
    padded patches (the tower runs on all of them)."""
    from duet_vlm.flops import encoder_flops

    model, _ = gemma4
    vision = model.config.vision_config
    patches = 16 * GEMMA4_KERNEL ** 2
    weights = sum(p.numel() for p in model.model.vision_tower.encoder.parameters() if p.dim() == 2)
    attention = 2 * 2 * vision.num_attention_heads * vision.head_dim * patches * patches * vision.num_hidden_layers
    counted = encoder_flops(vision.hidden_size, vision.intermediate_size, vision.num_attention_heads, vision.head_dim,
                            vision.num_hidden_layers, patches, vision.num_key_value_heads)
    assert counted - attention == 2 * patches * weights


def test_the_overlay_draws_an_images_soft_tokens_on_its_own_grid(gemma4, tmp_path):
    """A 3x4-token image's item is drawn on a 3x4 grid: its slots are its cells row by row, and the
    overlay of what DUET kept is written."""
    from PIL import Image

    from duet_vlm.compare import draw_item_overlay

    model, _ = gemma4
    inputs = gemma4_batch([[(3, 4)]], seed=2)
    reducer = duet_vlm.make("duet", budget=6)
    with torch.no_grad(), reducer(model):
        model(**inputs)
    item, = reducer.stats.items
    assert item.views == [("image", 3, 4)]
    assert item.cells.tolist() == [[0, r, c] for r in range(3) for c in range(4)]
    path = draw_item_overlay(Image.new("RGB", (48, 36)), item, tmp_path / "overlay.png")
    assert path.stat().st_size > 0


TURN = GEMMA_WINDOW + 4  # a second turn longer than the window: its own tokens leave each other's windows


@pytest.mark.parametrize("grids", [[(4, 4)], [(3, 4), (2, 4)]])
def test_a_second_turn_longer_than_the_window_equals_the_unpatched_model_fed_the_kept_tokens(gemma4, grids):
    """A turn of W + 4 text tokens in one call on the cache of a prompt VisionZip (dominant tokens
    only) reduced gives at every position of the turn the logits of the unpatched model fed the kept
    prompt and the turn in one prefill: the step's sliding masks keep the window among the turn's own
    tokens, which decoding one token at a time never tests."""
    model, _ = gemma4
    inputs = gemma4_batch([grids], seed=12, suffixes=[4])
    ids = inputs["input_ids"][0]
    n = len(ids)
    turn = torch.randint(3, 900, (1, TURN), generator=torch.Generator().manual_seed(13))
    reducer = _dominant_only()
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad(), reducer(model):
        model(**inputs, past_key_values=cache, use_cache=True)
        reduced = model(input_ids=turn, attention_mask=torch.ones(1, n + TURN, dtype=torch.long),
                        position_ids=torch.arange(n, n + TURN)[None], past_key_values=cache, use_cache=True).logits[0]
    keep = ids != GEMMA4_IMAGE
    keep[kept_slots(reducer, ids, GEMMA4_IMAGE)] = True
    kept = keep.nonzero()[:, 0]
    base, lm = model.model, model.model.language_model
    embeds, per_layer = _entry(model, inputs)
    with torch.no_grad():
        ideal = model(
            inputs_embeds=torch.cat([embeds[:, kept], base.get_input_embeddings()(turn)], dim=1),
            per_layer_inputs=torch.cat([per_layer[:, kept], lm.get_per_layer_inputs(turn, None)], dim=1),
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"][:, kept], torch.zeros_like(turn)], dim=1),
            attention_mask=torch.ones(1, len(kept) + TURN, dtype=torch.long),
        ).logits[0, len(kept):]
    torch.testing.assert_close(reduced, ideal, atol=1e-4, rtol=1e-4)


def test_a_second_turn_longer_than_the_window_after_a_boundary_equals_the_hand_built_ideal(gemma4):
    """The same turn on the cache of a prompt FastV pruned at layer 2: at every position of the
    turn, the logits of FastV's hand-built ideal of the prompt and the turn in one prefill (the tokens
    kept chosen by the prompt's last token; layers 2.. on the kept tokens and the turn, with Gemma 4's
    masks of that sequence, per-layer inputs and shared keys and values)."""
    model, referee = gemma4
    inputs = gemma4_batch([[(4, 4)]], seed=12, suffixes=[4])
    ids = inputs["input_ids"][0]
    n = len(ids)
    turn = torch.randint(3, 900, (1, TURN), generator=torch.Generator().manual_seed(13))
    reducer = duet_vlm.make("fastv", ratio=0.5)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad(), reducer(model):
        model(**inputs, past_key_values=cache, use_cache=True)
        reduced = model(input_ids=turn, attention_mask=torch.ones(1, n + TURN, dtype=torch.long),
                        position_ids=torch.arange(n, n + TURN)[None], past_key_values=cache, use_cache=True).logits[0]
    (item,) = reducer.stats.items
    (boundary, _), = item.stage_ids
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], turn], dim=1),
            "attention_mask": torch.ones(1, n + TURN, dtype=torch.long),
            "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(turn)], dim=1)}
    lm = referee.model.language_model
    embeds, per_layer = _entry(referee, full)
    with torch.no_grad():
        out = referee.model(**full, output_attentions=True, output_hidden_states=True)
        projected = lm.project_per_layer_inputs(embeds, per_layer)
    attention = out.attentions[boundary - 1][0, :, n - 1, :n].mean(dim=0)
    prompt_kept = fastv_kept_by_hand(attention, ids, GEMMA4_IMAGE, [item], boundary)
    kept = torch.cat([prompt_kept, torch.arange(n, n + TURN)])
    ideal = _layers_after_the_boundary(referee, full, out, projected, kept, boundary)
    torch.testing.assert_close(reduced, ideal[-TURN:], atol=1e-4, rtol=1e-4)
