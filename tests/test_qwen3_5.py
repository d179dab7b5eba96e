"""Qwen3.5 (and Qwen3.5-MoE): a hybrid language model, Gated-DeltaNet linear attention in three of
every four decoder layers, attention in every fourth (layers 3, 7, 11, 15 of the 16 here, the
released pattern).

The referee is built by hand from the unpatched model's own modules: its language model's entry
(embeddings with the tower's features, M-RoPE positions) captured on an unreduced run, then each
decoder layer called directly on the tokens the reducer kept, at their positions, with a hybrid
``DynamicCache`` (attention layers' keys and values, linear layers' convolution and recurrent
states), the final norm and the LM head. FastV's choice is recomputed from eager attention
probabilities of the layer before the boundary. The registry's six-layer models
(tests/models.py ``qwen3_5``, ``qwen3_5-moe``) run the invariant matrix of tests/test_invariants.py.
"""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version
from transformers import DynamicCache

import duet_vlm
from duet_vlm import compat
from duet_vlm.plan import LayerKindError

from checks import Force, hook_ids
from models import BUDGETED, QWEN_IMAGE, make_qwen3_5, qwen_batch, qwen_row

LAYERS = 16
ROWS = [[("image", 8, 8)], [("image", 12, 8)]]  # 16 and 24 merged tokens


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def hybrid(request):
    return make_qwen3_5(moe=request.param, layers=LAYERS)


def _one(b=0, seed=3):
    return qwen_row(qwen_batch(ROWS, seed=seed, frames_apart=True), ROWS, b)


def _entry(model, inputs):
    """The language model's entry on an unreduced run: ``inputs_embeds`` and the ``(4, B, L)``
    positions (text row, then M-RoPE), and the prompt's ``rope_deltas``."""
    seen = {}

    def keep(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"])

    handle = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"], seen["positions"], model.model.rope_deltas


def _layers(model, hidden, positions, layers, cache):
    """Decoder ``layers`` called directly (one row, no padding: causal attention, no recurrent mask)."""
    lm = model.model.language_model
    text, rope = (positions[0], positions[1:]) if positions.shape[0] == 4 else (None, positions)
    embeddings = lm.rotary_emb(hidden, rope)
    for layer in layers:
        hidden = layer(hidden, position_embeddings=embeddings, attention_mask=None, position_ids=text,
                       past_key_values=cache, use_cache=cache is not None)
    return hidden


def _head(model, hidden):
    return model.lm_head(model.model.language_model.norm(hidden))


def _last_token_attention(model, layer_index, hidden, positions):
    """FastV's score by the referee: the last token's eager attention probabilities in layer
    ``layer_index`` on its input, mean over heads."""
    lm = model.model.language_model
    layer = lm.layers[layer_index]
    attn = layer.self_attn
    previous = attn.config._attn_implementation
    attn.config._attn_implementation = "eager"
    try:
        _, probs = attn(layer.input_layernorm(hidden), lm.rotary_emb(hidden, positions[-3:]),
                        attention_mask=_causal(hidden))
    finally:
        attn.config._attn_implementation = previous
    return probs[0, :, -1].mean(dim=0)


def _causal(hidden):
    length = hidden.shape[1]
    mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)
    return mask[None, None]


def _kept_positions(stats, inputs, layer):
    """Sequence positions (of the full prompt) that enter decoder ``layer``: every text token and the
    item's entry tokens that survived the boundaries before it."""
    item = stats.items[0]
    start = int((inputs["input_ids"][0] == QWEN_IMAGE).nonzero()[0])
    ids = torch.arange(len(item.entry_slots))
    for boundary, survivors in item.stage_ids:
        if boundary <= layer:
            ids = survivors
    visual = inputs["input_ids"][0] == QWEN_IMAGE
    keep = ~visual.clone()
    keep[start + item.entry_slots[ids]] = True
    return keep.nonzero()[:, 0]


def _slots(keep):
    """Where the runtime puts each kept token's logits: just before the next kept token's slot
    (runtime/exit.py), so that shifted losses and ``logits_to_keep`` read them as usual."""
    return torch.cat([keep[1:] - 1, keep[-1:]])


# ----------------------------------------------------------------------------- where boundaries sit
def test_layer_kinds_and_the_boundaries_that_can_score(hybrid):
    adapter = duet_vlm.adapters.adapter_for(hybrid)
    assert adapter.family == "qwen3_5"
    assert adapter.scheme.attention_layers() == (3, 7, 11, 15)
    geometry = adapter.geometry
    assert geometry.boundary_layers("layer") == (7, 11, 15)  # the stage reads the layer after the boundary
    assert geometry.boundary_layers("previous") == (4, 8, 12)  # ... the layer before it (FastV)
    assert geometry.boundary_layers(None) == tuple(range(4, 16))  # ... states, after any layer from the first attention layer (V2Drop)
    # Defaults move to those layers before the budget is solved, so the budget still holds.
    for name, reads in (("duet", "layer"), ("pyramiddrop", "layer"), ("fastv", "previous"), ("sparsevlm", "previous"),
                        ("v2drop", None)):
        plan = duet_vlm.make(name, budget=500).resolve(geometry)
        layers = [layer for layer, _ in plan.schedule.boundaries]
        assert layers and set(layers) <= set(geometry.boundary_layers(reads)), (name, layers)
        assert abs(plan.schedule.average - 500) <= 1, name


def test_a_model_where_no_boundary_can_score_refuses_the_language_stage():
    """Four layers, attention in layer 3 only: no boundary after it where DUET (reading the layer after
    the boundary) could score. Its language stage is refused, not silently left out."""
    from duet_vlm.geometry import Geometry

    geometry = Geometry(4, 16, (4, 4), False, attention_layers=(3,), rope="mrope")
    with pytest.raises(LayerKindError, match="boundaries that work: \\[\\]"):
        duet_vlm.make("duet", ratio=0.5).resolve(geometry)
    assert duet_vlm.make("duet", ratio=0.5, layers=(), ratios=()).resolve(geometry).language is None  # Stage A alone runs


# Every language-side method's explicit boundary options, as a function of the boundary layer.
EXPLICIT = {
    "fastv": lambda layer: dict(layer=layer, keep=10),
    "dart": lambda layer: dict(layer=layer, keep=10),
    "random_horizon": lambda layer: dict(layer=layer, keep=10),
    "pyramiddrop": lambda layer: dict(layers=(layer,), ratios=(0.5,)),
    "sparsevlm": lambda layer: dict(layers=(layer,), keep=(10,)),
    "duet": lambda layer: dict(ratio=0.5, layers=(layer,), ratios=(0.5,)),
    "pio": lambda layer: dict(ratio=0.5, layers=(layer,), ratios=(0.5,)),
    "vscan": lambda layer: dict(ratio=0.5, layers=(layer,), ratios=(0.5,)),
    "holitom": lambda layer: dict(ratio=0.5, layer=layer),
    "v2drop": lambda layer: dict(layers=(layer,), ratios=(0.5,)),
    "apet": lambda layer: dict(ratio=0.5, layer=layer),
}


def test_every_language_side_method_has_its_explicit_boundary_case():
    assert set(EXPLICIT) == {name for name in duet_vlm.METHODS if duet_vlm.METHODS[name].prunes_in_language_model()}


@pytest.mark.parametrize("name", sorted(EXPLICIT))
def test_an_explicit_boundary_is_honoured_or_refused_never_moved(hybrid, name):
    """Only a method's default boundaries move to a layer where its stage can score (``Geometry.snap``).
    A boundary the user gives is kept exactly where it can score (the stage runs there), and refused
    at attach with ``LayerKindError`` where it cannot, naming the layers that work and leaving the
    model's hooks as they were (it once moved silently: FastV's ``layer=6`` ran after layer 4)."""
    geometry = duet_vlm.adapters.adapter_for(hybrid).geometry
    reads = type(duet_vlm.make(name, ratio=0.5).resolve(geometry, quiet=True).language).reads
    allowed = geometry.boundary_layers(reads)
    wrong = next(layer for layer in range(2, LAYERS) if layer not in allowed)
    hooks = hook_ids(hybrid)
    with pytest.raises(LayerKindError) as error:
        duet_vlm.make(name, **EXPLICIT[name](wrong)).attach(hybrid).remove()  # removed if it was not refused
    message = str(error.value)
    assert f"layer(s) [{wrong}]" in message and f"boundaries that work: {list(allowed)}" in message, message
    assert hook_ids(hybrid) == hooks
    right = allowed[len(allowed) // 2]
    reducer = duet_vlm.make(name, **EXPLICIT[name](right))
    with torch.no_grad(), reducer(hybrid):
        hybrid(**_one())
    boundaries = [layer for layer, _ in reducer.stats.items[0].stage_ids]
    assert boundaries == [right], (name, boundaries)
    assert hook_ids(hybrid) == hooks


# ----------------------------------------------------------------------------- against the ideal
def test_fastv_equals_the_hand_built_ideal_in_prefill_and_cached_decoding(hybrid):
    """FastV after layer 4 (layer 3 attends): the reduced prefill's logits at every kept position,
    and the next decoding step's logits, equal the unpatched layers fed the same kept tokens (linear
    layers 4-6, 8-10, 12-14 run their recurrence over the kept tokens only); the kept tokens are
    the top of layer 3's eager attention from the last token."""
    inputs = _one()
    reducer = duet_vlm.make("fastv", ratio=0.5)
    with torch.no_grad(), reducer(hybrid):
        out = hybrid.generate(**inputs, max_new_tokens=2, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, output_logits=True)
        logits = hybrid(**inputs).logits[0]
    (boundary, survivors), = reducer.stats.items[0].stage_ids
    assert boundary == 4

    embeds, positions, deltas = _entry(hybrid, inputs)
    lm = hybrid.model.language_model
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        hidden = _layers(hybrid, embeds, positions, lm.layers[:3], cache)
        scores = _last_token_attention(hybrid, 3, hidden, positions)
        hidden = _layers(hybrid, hidden, positions, lm.layers[3:4], cache)
        keep = _kept_positions(reducer.stats, inputs, layer=boundary)
        visual = (inputs["input_ids"][0] == QWEN_IMAGE).nonzero()[:, 0]
        chosen = scores[visual].topk(len(survivors)).indices.sort().values
        assert torch.equal(visual[chosen], keep[torch.isin(keep, visual)])  # the referee's choice
        hidden = _layers(hybrid, hidden[:, keep], positions[:, :, keep], lm.layers[4:], cache)
        ideal = _head(hybrid, hidden)[0]
        torch.testing.assert_close(logits[_slots(keep)], ideal, atol=1e-5, rtol=1e-5)
        # One decoding step on the hybrid cache: the first generated token at the next position.
        token = out.sequences[:, inputs["input_ids"].shape[1]][:, None]
        step = torch.full((4, 1, 1), inputs["input_ids"].shape[1])
        step[1:] += deltas.view(1, -1, 1)
        hidden = _layers(hybrid, hybrid.model.get_input_embeddings()(token), step, lm.layers, cache)
        torch.testing.assert_close(out.logits[1][0], _head(hybrid, hidden)[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cdpruner", "divprune"])
def test_a_vision_side_method_equals_the_hand_built_ideal(hybrid, name):
    """Tokens dropped before the language model: the unpatched model fed the kept merged tokens at
    their M-RoPE positions gives the same logits at every position."""
    inputs = _one()
    reducer = duet_vlm.make(name, ratio=0.5)
    with torch.no_grad(), reducer(hybrid):
        logits = hybrid(**inputs).logits[0]
    keep = _kept_positions(reducer.stats, inputs, layer=0)
    assert len(keep) < inputs["input_ids"].shape[1]
    embeds, positions, _ = _entry(hybrid, inputs)
    with torch.no_grad():
        ideal = _head(hybrid, _layers(hybrid, embeds[:, keep], positions[:, :, keep],
                                      hybrid.model.language_model.layers, None))[0]
    torch.testing.assert_close(logits[_slots(keep)], ideal, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- generation and training
@pytest.mark.parametrize("name", ["duet", "fastv", "pyramiddrop", "sparsevlm", "dart", "pio", "visionzip"])
def test_cached_decoding_equals_uncached(hybrid, name):
    """generate with the hybrid cache (attention KV of the kept tokens, linear-attention states of
    the shortened prompt) gives the tokens and scores of generate without a cache, which runs the
    prefill again each step with the same selection."""
    inputs = _one(b=1)
    reducer = duet_vlm.make(name, ratio=0.5)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), reducer(hybrid):
        cached = hybrid.generate(**inputs, **kwargs)
        if compat.INSTALLED < Version(compat.ENCODES_BEFORE_PREFILL["qwen3_5"]) and name not in ("visionzip",):
            # generate re-encodes the images at every step there: refused, not selected again
            with pytest.raises(NotImplementedError, match="needs transformers 5.20.2 or newer for qwen3_5"):
                hybrid.generate(**inputs, use_cache=False, **kwargs)
            return
        uncached = hybrid.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_every_method_runs_on_the_released_layer_pattern(hybrid):
    """Every registered method at half the tokens, on 16 layers with attention in every 4th: it
    generates, and each item averages what its plan says (the boundaries moved to where they score)."""
    inputs = qwen_batch(ROWS, seed=4, frames_apart=True)
    for name in BUDGETED:  # pixelprune's count follows the pixels: tests/test_pixelprune.py
        reducer = duet_vlm.make(name, ratio=0.5)
        with torch.no_grad(), reducer(hybrid):
            hybrid.generate(**inputs, max_new_tokens=2, do_sample=False)
        for item in reducer.stats.items:
            expected = item.tokens if name == "full" else round(0.5 * item.tokens)
            assert abs(item.average_tokens - expected) <= 1, (name, item.tokens_per_layer)


def test_training_step_equals_the_ideal(hybrid):
    """A training forward under FastV: the loss and every parameter's gradient equal the hand-built
    ideal's (the same kept tokens through the unpatched layers, the model's own loss on the kept
    labels)."""
    inputs = _one()
    labels = inputs["input_ids"].clone()
    labels[inputs["input_ids"] == QWEN_IMAGE] = -100
    reducer = duet_vlm.make("fastv", ratio=0.5)
    hybrid.zero_grad()
    with reducer(hybrid):
        loss = hybrid(**inputs, labels=labels).loss
        loss.backward()
    reduced = {name: p.grad.clone() for name, p in hybrid.named_parameters() if p.grad is not None}
    (boundary, _), = reducer.stats.items[0].stage_ids
    keep = _kept_positions(reducer.stats, inputs, layer=boundary)

    hybrid.zero_grad()
    lm = hybrid.model.language_model
    embeds, positions, _ = _entry_with_grad(hybrid, inputs)
    hidden = _layers(hybrid, embeds, positions, lm.layers[:boundary], None)
    hidden = _layers(hybrid, hidden[:, keep], positions[:, :, keep], lm.layers[boundary:], None)
    logits = _head(hybrid, hidden)
    ideal = hybrid.loss_function(logits=logits, labels=labels[:, keep], vocab_size=hybrid.config.text_config.vocab_size)
    ideal.backward()
    torch.testing.assert_close(loss, ideal, atol=1e-6, rtol=1e-6)
    grads = {name: p.grad for name, p in hybrid.named_parameters() if p.grad is not None}
    assert grads.keys() == reduced.keys() and any("linear_attn" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(reduced[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    hybrid.zero_grad()


def _entry_with_grad(model, inputs):
    """``_entry`` keeping the graph: the tower and embeddings run with gradients, as in training."""
    seen = {}

    def stop(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"])
        raise _Stop

    handle = model.model.language_model.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["embeds"], seen["positions"], model.model.rope_deltas


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_get_a_clear_error_and_leave_the_model_as_it_was(hybrid):
    hooks = hook_ids(hybrid)
    reducer = duet_vlm.make("duet", ratio=0.5)
    inputs = _one()
    with reducer(hybrid):
        wrong = dict(inputs, input_ids=inputs["input_ids"].clone())
        first = int((wrong["input_ids"][0] == QWEN_IMAGE).nonzero()[0])
        wrong["input_ids"][0, first] = 50  # one placeholder fewer than the grid's tokens
        with pytest.raises(ValueError, match="tokens|features"):
            hybrid(**wrong)
        missing = {k: v for k, v in inputs.items() if k != "image_grid_thw"}
        with pytest.raises((ValueError, TypeError, AttributeError)):
            hybrid(**missing)
        with torch.no_grad():  # and the next call is served as usual
            again = hybrid(**inputs).logits
    assert hook_ids(hybrid) == hooks
    with torch.no_grad(), duet_vlm.make("duet", ratio=0.5)(hybrid):
        assert torch.equal(hybrid(**inputs).logits, again)


# ----------------------------------------------------------------------------- costs per layer kind
def test_flops_and_cache_bytes_per_layer_kind(hybrid):
    """``DecoderDims.from_config`` on the hybrid decoder: each layer's FLOPs besides the sequence
    mixing (attention's ``n²`` products, the recurrence) are two per token per weight of its
    matrices (the gated query counted), and the cache bytes equal what a prefill leaves in the
    model's own hybrid cache (keys and values per token; a fixed convolution window and float32
    recurrent state per linear-attention layer, which do not shrink with the tokens)."""
    from duet_vlm.flops import DecoderDims, kv_cache_bytes, layer_flops

    text = hybrid.config.text_config
    dims = DecoderDims.from_config(text)
    lm = hybrid.model.language_model
    n = 7
    for index, layer in enumerate(lm.layers):
        matrices = sum(p.numel() for name, p in layer.named_parameters()
                       if p.dim() >= 2 and "norm" not in name and "gate.weight" not in name)
        if dims.kind(index) == "linear_attention":
            linear = dims.linear
            mixing = 2 * 4 * n * linear.value_heads * linear.key_head_dim * linear.value_head_dim
        else:
            mixing = 2 * 2 * dims.heads * dims.head_dim * (n * (n + 1) // 2)
        if getattr(text, "num_experts", None):  # active experts only: checked for the dense model
            continue
        assert layer_flops(dims, index, n) - mixing == 2 * n * matrices, index
    inputs = _one()
    with torch.no_grad():
        cache = hybrid(**inputs, use_cache=True).past_key_values
    held = 0
    for cached in cache.layers:
        if hasattr(cached, "recurrent_states"):
            held += sum(t.numel() * t.element_size() for t in (cached.conv_states[0], cached.recurrent_states[0]))
        else:
            held += sum(t.numel() * t.element_size() for t in (cached.keys, cached.values))
    length = inputs["input_ids"].shape[1]
    assert kv_cache_bytes(dims, [length] * len(lm.layers), bytes_per_element=4) == held
    assert dims.layer_kinds == duet_vlm.adapters.adapter_for(hybrid).scheme.kinds


# ----------------------------------------------------------------------------- generation modes
def test_sampling_several_sequences_equals_the_prompt_repeated(hybrid):
    """``num_return_sequences=2`` under DUET (the hybrid cache's states repeated with the rows) gives
    the tokens of the prompt repeated in a batch, same seed."""
    if compat.INSTALLED < Version(compat.ENCODES_BEFORE_PREFILL["qwen3_5"]):
        pytest.skip("before transformers 5.20.2 the unpatched Qwen3.5 itself samples several sequences unlike the "
                    "prompt repeated (measured on 5.19.0, where generate hands each step the pixels)")
    inputs = _one()
    reducer = duet_vlm.make("duet", ratio=0.5)
    kwargs = dict(max_new_tokens=4, do_sample=True, top_k=5)
    with torch.no_grad(), reducer(hybrid):
        torch.manual_seed(7)
        several = hybrid.generate(**inputs, num_return_sequences=2, **kwargs)
        torch.manual_seed(7)
        repeated = hybrid.generate(**{k: torch.cat([v, v]) for k, v in inputs.items() if k != "pixel_values"},
                                   pixel_values=torch.cat([inputs["pixel_values"]] * 2), **kwargs)
    assert torch.equal(several, repeated)


def test_beam_search_equals_each_prompt_alone(hybrid):
    """Beam search (the cache reordered between beams: keys, values and linear-attention states) on a
    padded batch of two prompts under FastV: each row's beams equal that prompt's alone."""
    batch = qwen_batch(ROWS, seed=5, frames_apart=True)
    reducer = duet_vlm.make("fastv", ratio=0.5)
    kwargs = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad(), reducer(hybrid):
        together = hybrid.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
        for b in range(2):
            alone = qwen_row(batch, ROWS, b)
            assert torch.equal(together[b], hybrid.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1]:]), b


def test_a_text_turn_on_the_hybrid_cache_equals_one_call(hybrid):
    """A language-side method keeps the entry whole, so a second, text-only turn on the first turn's
    cache (attention KV of the kept tokens, linear-attention states of the shortened prompt) runs
    like decoding steps: its tokens and logits equal one call with the same tokens forced. A
    vision-side method leaves the cache shorter than the prompt: the second turn is refused."""
    inputs, follow = _one(), torch.tensor([[11, 12, 13]])
    width = inputs["input_ids"].shape[1]
    reducer = duet_vlm.make("fastv", ratio=0.5)
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), reducer(hybrid):
        first = hybrid.generate(**inputs, max_new_tokens=3, **kwargs)
        ids = torch.cat([first.sequences, follow], dim=1)
        second = hybrid.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=first.past_key_values,
                                 max_new_tokens=3, **kwargs)
        forced = hybrid.generate(**inputs, max_new_tokens=9, logits_processor=[Force(width + 3, follow[0].tolist())], **kwargs)
    assert torch.equal(second.sequences, forced.sequences)
    for a, b in zip(second.logits, forced.logits[6:]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    vision = duet_vlm.make("visionzip", ratio=0.5)
    with torch.no_grad(), vision(hybrid):
        first = hybrid.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([first.sequences, follow], dim=1)
        with pytest.raises(NotImplementedError, match="without past_key_values"):
            hybrid.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=first.past_key_values,
                            max_new_tokens=2, do_sample=False)


def test_full_without_a_cache_runs_on_after_a_generated_placeholder(hybrid):
    """``use_cache=False`` re-runs the whole prompt each step; once the model emits a video placeholder
    id (forced here) the prompt holds a placeholder without a video. The unpatched model reads it as
    text and runs on: ``full`` gives the same tokens and bit-identical logits (it once raised "video
    placeholders, but no video_grid_thw"). A method that reduces refuses it, saying why."""
    from models import QWEN_VIDEO

    inputs = _one()
    width = inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=4, do_sample=False, use_cache=False, output_logits=True, return_dict_in_generate=True,
                  logits_processor=[Force(width + 1, [QWEN_VIDEO])])
    with torch.no_grad():
        plain = hybrid.generate(**inputs, **kwargs)
        with duet_vlm.make("full")(hybrid):
            full = hybrid.generate(**inputs, **kwargs)
        assert plain.sequences[0, width + 1] == QWEN_VIDEO
        assert torch.equal(full.sequences, plain.sequences)
        for a, b in zip(full.logits, plain.logits):
            assert torch.equal(a, b)
        with pytest.raises(NotImplementedError, match="placeholder id in the text without its item"):
            with duet_vlm.make("visionzip", ratio=0.5)(hybrid):
                hybrid.generate(**inputs, **kwargs)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_a_text_turn_on_a_cache_a_vision_stage_shortened_is_refused_for_every_prompt(moe):
    """The issue's case: 8 layers (attention in 3 and 7), rows of 8x8 and 12x8 patches, three tokens
    then a text-only turn on the returned cache. Qwen3.5's ``generate`` passes the language model no
    2-D mask and, on a continued cache, its text positions plus the M-RoPE deltas: the resent prompt
    was once seen only where the resent part held a placeholder (one row refused, the other
    continuing on attention caches shorter than prompt + generated, with other tokens)."""
    model = make_qwen3_5(moe=moe, layers=8)
    batch = qwen_batch(ROWS, seed=3)
    for b in range(2):
        inputs = qwen_row(batch, ROWS, b)
        for name in ("duet", "holitom", "visionzip"):
            with torch.no_grad(), duet_vlm.make(name, ratio=0.5)(model):
                first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
                assert reducer_entry_shortened(first, inputs), (name, b)
                ids = first.sequences
                with pytest.raises(NotImplementedError, match="without past_key_values"):
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   past_key_values=first.past_key_values, max_new_tokens=3, do_sample=False)


def reducer_entry_shortened(out, inputs) -> bool:
    """Whether the first attention layer's cache holds fewer than prompt + generated tokens."""
    cache = out.past_key_values
    generated = out.sequences.shape[1] - inputs["input_ids"].shape[1] - 1  # the last token is not cached yet
    return cache.get_seq_length() < inputs["input_ids"].shape[1] + generated


@pytest.mark.parametrize("name", ["fastv", "dart"])
def test_an_explicit_layer_equal_to_the_default_is_still_explicit(hybrid, name):
    """``layer=2`` given (FastV's and DART's default number) is the user's layer, in the budget and the
    ratio forms alike: refused on the released pattern (layer 1 is linear attention), while the
    default moves to layer 4."""
    for reducer in (duet_vlm.make(name, budget=12, layer=2), duet_vlm.make(name, ratio=0.5, layer=2)):
        with pytest.raises(LayerKindError, match=r"layer\(s\) \[2\]"):
            reducer.attach(hybrid).remove()
    reducer = duet_vlm.make(name, ratio=0.5)
    with torch.no_grad(), reducer(hybrid):
        hybrid(**_one())
    assert [layer for layer, _ in reducer.stats.items[0].stage_ids] == [4]


def test_a_prefill_without_a_cache_that_continues_with_images_encoded_again_is_refused_where_generate_does_that(
        hybrid, monkeypatch):
    """On transformers 5.19.0 to 5.20.1, Qwen3.5's generate without a cache encodes the images again at
    every step, and a method that prunes inside the language model would select again from the grown
    prompt (``compat.check_reencoded``). A forward without a cache that continues the last one's prompt
    with its images encoded again is refused there, naming 5.20.2 (here the installed release is read
    as 5.19.0); on a release that encodes before the prefill it runs, selecting for its own prompt."""
    inputs = _one(b=1)
    length = inputs["input_ids"].shape[1]
    grown = {key: torch.cat([value, value[:, -1:]], dim=1)  # the prompt and its last (text) token again
             if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == length else value
             for key, value in inputs.items()}
    reducer = duet_vlm.make("fastv", ratio=0.5)
    with torch.no_grad(), reducer(hybrid):
        monkeypatch.setattr(compat, "INSTALLED", Version("5.20.2"))
        hybrid(**inputs, use_cache=False)
        hybrid(**grown, use_cache=False)  # a release that encodes before the prefill: runs
        monkeypatch.setattr(compat, "INSTALLED", Version("5.19.0"))
        hybrid(**inputs, use_cache=False)
        with pytest.raises(NotImplementedError, match=r"needs transformers 5\.20\.2 or newer for qwen3_5.*Generate with the cache"):
            hybrid(**grown, use_cache=False)
        hybrid(**inputs, use_cache=False)  # nothing left behind: the next forward runs
