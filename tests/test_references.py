"""The runtime's outputs against references computed independently in the test, on small LLaVA models.

Each test names the bug it catches. The references are the unpatched model (its own eager attention,
its own positions), a row run alone, or a direct computation from the model's modules; nothing here
imports the runtime's private names.
"""

import pytest
import torch
import torch.nn.functional as F

import duet_vlm

from checks import reference_nms
from models import IMAGE_TOKEN, make_inputs, make_llava


def _probe(module, store: list, *, pre: bool = True):
    """Record every call's (args, kwargs) (pre-hook; a copy of the dict, which later hooks may update in
    place) or output of ``module``; returns the handle."""
    if pre:
        return module.register_forward_pre_hook(lambda m, a, kw: store.append((a, dict(kw))), with_kwargs=True)
    return module.register_forward_hook(lambda m, a, out: store.append(out))


# ----------------------------------------------------------------------------- Stage-B scores under GQA
def test_gqa_text_to_visual_attention_equals_the_layers_own_eager_attention():
    """``LayerScheme.text_to_visual_attention`` on a grouped-query model (4 query heads, 2 KV heads,
    each KV head its own random projection) equals the attention probabilities the same decoder layer
    computes in eager mode on a plain forward (``output_attentions``), averaged over heads and query
    rows at the visual positions, for every layer and both rows of a left-padded batch.

    Catches query heads paired with the wrong KV head (``repeat`` instead of ``repeat_interleave``:
    heads 0..3 would read KV heads 0,1,0,1 instead of 0,0,1,1), a mask or RoPE slip in the scorer.
    """
    model = make_llava(layers=4, heads=4, kv_heads=2, image_size=112, attn="eager", seed=2)
    adapter = duet_vlm.adapter_for(model)
    inputs = make_inputs(model, batch=2, suffix=(9, 5), seed=3)
    mask = inputs["attention_mask"].bool()
    layer_inputs = [[] for _ in adapter.layers]
    handles = [_probe(layer, layer_inputs[i]) for i, layer in enumerate(adapter.layers)]
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    ids = inputs["input_ids"]
    visual = torch.stack([(r == IMAGE_TOKEN).nonzero()[:, 0] for r in ids])[:, None]  # (B, 1, 64)
    queries = [((r != IMAGE_TOKEN) & m).nonzero()[:, 0] for r, m in zip(ids, mask)]
    queries = [q[q > v.max()] for q, v in zip(queries, visual)]  # the text after the image
    assert [len(q) for q in queries] == [9, 5]
    for index, layer in enumerate(adapter.layers):
        (args, kwargs), = layer_inputs[index]
        hidden = args[0] if args else kwargs["hidden_states"]
        scores = adapter.scheme.text_to_visual_attention(
            layer, hidden, kwargs["position_embeddings"], queries, mask, visual
        )
        probs = out.attentions[index].float()  # (B, H, L, L), the layer's own softmax
        expected = torch.stack([
            probs[b][:, queries[b]][:, :, visual[b, 0]].mean(dim=(0, 1))[None] for b in range(2)
        ])
        torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-4, msg=f"layer {index}")


def test_text_to_visual_attention_of_bfloat16_inputs_is_computed_in_float32():
    """``visual_attention`` on bfloat16 queries and keys (a bfloat16 model's layer) gives, bit for bit
    (``torch.equal``, float32), the scores of the same call on those values upcast to float32: the
    logits, the softmax and the means are float32 whatever the model's dtype. The premise, checked
    here: on these inputs the logits computed in bfloat16 differ from the float32 ones. Catches the
    upcast dropped (``query @ keys`` in the model's dtype: scores rounded to bfloat16's 8 bits, and
    near-tied tokens swapped)."""
    from duet_vlm.adapters.scheme import visual_attention

    generator = torch.Generator().manual_seed(0)
    query = (3 * torch.randn(1, 4, 5, 32, generator=generator)).bfloat16()  # 4 query heads
    keys = (3 * torch.randn(1, 2, 40, 32, generator=generator)).bfloat16()  # 2 KV heads
    q_pos, valid = torch.arange(35, 40), torch.ones(40, dtype=torch.bool)
    visual = torch.arange(4, 28).view(2, 12)  # two items of 12 tokens
    valid[30] = False  # and a padded key
    in_bfloat16 = query @ keys.repeat_interleave(2, dim=1).transpose(-1, -2)
    in_float32 = query.float() @ keys.float().repeat_interleave(2, dim=1).transpose(-1, -2)
    assert not torch.equal(in_bfloat16.float(), in_float32), "the premise: bfloat16 arithmetic rounds these logits"
    scores = visual_attention(query, keys, q_pos, valid, visual, scaling=32 ** -0.5, groups=2)
    upcast = visual_attention(query.float(), keys.float(), q_pos, valid, visual, scaling=32 ** -0.5, groups=2)
    assert torch.equal(scores, upcast)
    assert scores.dtype == torch.float32


# ----------------------------------------------------------------------------- an LM head with a bias
@pytest.mark.parametrize("name", ["duet", "fastv", "visionzip"])
def test_compacted_lm_head_keeps_its_bias(name):
    """Full-forward logits under a reducer, with an ``lm_head`` that has a (nonzero) bias: at every
    position they equal the same model's logits without the bias plus the bias, and the biased head
    applied to the language model's (scattered) output, which holds zeros at dropped slots.

    Catches the compacted head (run on the kept states only, the logits put back in place) dropping
    the bias: at dropped slots the head of a zero state gives the bias, not zeros.
    """
    model = make_llava(layers=4, image_size=112, seed=7)
    inputs = make_inputs(model, batch=2, suffix=(6, 4), seed=8)
    plain_head = model.lm_head
    biased = torch.nn.Linear(plain_head.in_features, plain_head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(plain_head.weight)
        biased.bias.copy_(torch.randn(biased.out_features, generator=torch.Generator().manual_seed(1)))
    results = {}
    for key, head in (("plain", plain_head), ("biased", biased)):
        model.lm_head = head
        hidden = []
        reducer = duet_vlm.make(name, ratio=0.6)
        with torch.no_grad(), reducer(model):
            probe = _probe(model.model, hidden, pre=False)
            try:
                results[key] = model(**inputs).logits
            finally:
                probe.remove()
        results[key + " hidden"] = hidden[0].last_hidden_state
    model.lm_head = plain_head
    dropped = (results["plain hidden"] == 0).all(-1)
    assert dropped.sum() > 40  # the reducer did drop slots: the bias matters there
    torch.testing.assert_close(results["biased"], results["plain"] + biased.bias, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(results["biased"], biased(results["biased hidden"]), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- padded batches, every position
def _uneven_batch(model, images=(2, 1), suffix=(6, 11), answer=4, seed=0):
    """Left-padded rows ``<s> (5 ids + an image) * images[b] + suffix[b] ids`` whose reduced lengths
    differ (different image counts), labels on each row's last ``answer`` ids; and each row alone."""
    generator = torch.Generator().manual_seed(seed)
    n_image = model.config.image_seq_length
    rows = []
    for count, tail in zip(images, suffix):
        ids = [1]
        for _ in range(count):
            ids += torch.randint(3, 900, (5,), generator=generator).tolist() + [IMAGE_TOKEN] * n_image
        rows.append(ids + torch.randint(3, 900, (tail,), generator=generator).tolist())
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer:] = input_ids[:, -answer:]
    size = model.config.vision_config.image_size
    pixels = torch.randn(sum(images), 3, size, size, generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels, "labels": labels}
    alone, first = [], 0
    for b, count in enumerate(images):
        keep = attention_mask[b].bool()
        alone.append({
            "input_ids": input_ids[b : b + 1, keep], "attention_mask": attention_mask[b : b + 1, keep],
            "pixel_values": pixels[first : first + count], "labels": labels[b : b + 1, keep],
        })
        first += count
    return batch, alone


@pytest.fixture(scope="module")
def small_llava8():
    """8 decoder layers, 64 patches per image (112 px), multi-head attention, sdpa."""
    return make_llava(layers=8, image_size=112, seed=3)


@pytest.mark.parametrize("name", ["visionzip", "fastv", "duet"])
def test_uneven_padded_batch_equals_rows_alone_at_every_position_and_in_the_loss(small_llava8, name):
    """Rows holding 2 and 1 images reduce to different lengths, so the last layer group carries
    alignment pads. Each row's logits at every valid position, its loss (labels on the answer) and
    the batch loss (the token-weighted mean of the rows' own losses) equal the row run alone.

    Catches a scatter-back of the padded prefill that puts a row's states in the wrong slots (the
    last logits, which earlier padded tests compare, stay right), so logits and labels misalign,
    for a vision-side (visionzip), a language-side (fastv) and a two-stage (duet) method.
    """
    model = small_llava8
    batch, alone = _uneven_batch(model)
    reducer = duet_vlm.make(name, ratio=0.5)
    with torch.no_grad(), reducer(model):
        out = model(**batch)
        singles = [model(**single) for single in alone]
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    counts = [int((single["labels"][0, 1:] != -100).sum()) for single in alone]
    for b, single in enumerate(singles):
        torch.testing.assert_close(out.logits[b, mask[b]], single.logits[0], atol=1e-4, rtol=1e-4, msg=f"row {b}")
        row_loss = F.cross_entropy(out.logits[b, :-1], labels[b, 1:], ignore_index=-100)
        torch.testing.assert_close(row_loss, single.loss, atol=1e-5, rtol=1e-5, msg=f"row {b} loss")
    expected = sum(n * s.loss for n, s in zip(counts, singles)) / sum(counts)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- decoding positions, "original"
def _decoding_positions(model, reducer, inputs, manual: bool, steps: int = 3):
    """``(position_ids, cos)`` every decoder layer receives in each of ``steps`` decoding steps, and
    each step's logits: through ``generate``, or (``manual``) a loop passing the grown full-length
    mask and the cache but no positions. The probes sit after the reducer's hooks."""
    layers = model.model.language_model.layers
    seen: list[dict[int, tuple]] = []

    def hook(index):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == 1:  # a decoding step
                if index == 0:
                    seen.append({})
                seen[-1][index] = (kwargs["position_ids"], kwargs["position_embeddings"][0])
        return record

    handle = reducer.attach(model) if reducer is not None else None
    probes = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            if not manual:
                out = model.generate(**inputs, max_new_tokens=steps + 1, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
                logits = list(out.scores[1:])
            else:
                out = model(**inputs, use_cache=True)
                mask, logits = inputs["attention_mask"], []
                token = out.logits[:, -1:].argmax(-1)
                for _ in range(steps):
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                    out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
                    logits.append(out.logits[:, -1])
                    token = logits[-1].argmax(-1, keepdim=True)
    finally:
        for probe in probes:
            probe.remove()
        if handle is not None:
            handle.remove()
    return seen, logits


@pytest.mark.parametrize(
    "build",
    [lambda: duet_vlm.Duet(budget=16, positions="original"),
     lambda: duet_vlm.Compose(duet_vlm.VisionZip(), duet_vlm.PyramidDrop(), budget=16, positions="original")],
    ids=["duet", "visionzip+pyramiddrop"],
)
def test_decoding_after_a_vision_stage_keeps_the_original_positions(small_llava8, build):
    """``positions="original"`` after a vision stage (fewer tokens enter the language model, so the
    KV cache is shorter than the prompt): in every decoding step, through ``generate`` and through a
    manual loop that passes the mask but no positions, every decoder layer receives the position the
    unreduced model gives the new token (``L + step``) and the RoPE of that position; the manual loop's
    logits equal ``generate``'s scores.

    Catches decoding positions numbered from the reduced cache's length (or shifted by the dropped
    tokens) in original mode, which batch-versus-row comparisons cannot see (both are off alike)."""
    model = small_llava8
    inputs = make_inputs(model, suffix=6, seed=12)
    length = inputs["input_ids"].shape[1]
    rotary = model.model.language_model.rotary_emb
    plain = {manual: _decoding_positions(model, None, inputs, manual)[0] for manual in (False, True)}
    results = {}
    for manual in (False, True):
        reducer = build()
        seen, logits = _decoding_positions(model, reducer, inputs, manual)
        assert reducer.stats.llm_input_tokens < 64  # a vision stage ran: the cache is shorter than the prompt
        results[manual] = logits
        assert len(seen) == 3
        for step, layers in enumerate(seen):
            expected = torch.tensor([[length + step]])
            assert torch.equal(plain[manual][step][0][0], expected)  # the unreduced model's own position
            cos, _ = rotary(layers[0][1], expected)
            for index, (positions, layer_cos) in sorted(layers.items()):
                assert torch.equal(positions, expected), f"manual={manual}, step {step}, layer {index}"
                torch.testing.assert_close(layer_cos, cos, atol=0, rtol=0, msg=f"step {step}, layer {index}")
    for step, (manual, generated) in enumerate(zip(results[True], results[False])):
        torch.testing.assert_close(manual, generated, atol=1e-4, rtol=1e-4, msg=f"step {step}")


# ----------------------------------------------------------------------------- Stage-B queries with two images
@pytest.mark.parametrize("answer", [0, 3], ids=["inference", "training"])
def test_stage_b_queries_are_the_text_after_the_last_image(small_llava8, answer):
    """Two images per row with text between them, a left-padded batch: at every Stage-B boundary the
    query positions DUET's default ``query="text"`` gets (``view.text_after_image``, captured by a
    query callable that returns them unchanged) are exactly the row's prompt tokens after its last
    image (without the answer when labels are given), located independently: the tail of the current
    sequence, holding the ids that follow the last image in ``input_ids``.

    Catches the text between the two images (after the first image) scored as queries."""
    model = small_llava8
    inputs = make_inputs(model, batch=2, images_per_row=2, suffix=(7, 4), seed=13)
    labels = torch.full_like(inputs["input_ids"], -100)
    if answer:
        labels[:, -answer:] = inputs["input_ids"][:, -answer:]
    calls = []

    def capture(view):
        calls.append((view.layer_index, [q.clone() for q in view.text_after_image], view.input_ids.clone()))
        return view.text_after_image

    # both boundaries keep some tokens (the default's last keeps none, and scores nothing)
    reducer = duet_vlm.Duet(budget=16, query=capture, layers=(4, 6), ratios=(0.5, 0.25))
    with torch.no_grad(), reducer(model):
        model(**inputs, **({"labels": labels} if answer else {}))
    assert [layer for layer, _, _ in calls] == [layer for layer, _ in reducer.stats.stage_kept] and len(calls) == 2
    for layer, queries, view_ids in calls:
        for b, positions in enumerate(queries):
            ids = inputs["input_ids"][b]
            last_image = int((ids == IMAGE_TOKEN).nonzero().max())
            after = ids[last_image + 1 : len(ids) - answer]  # the instruction after the last image
            length = view_ids.shape[1]
            expected = torch.arange(length - answer - len(after), length - answer)
            assert positions.tolist() == expected.tolist(), f"layer {layer}, row {b}"
            assert torch.equal(view_ids[b, positions], after)


# ----------------------------------------------------------------------------- PIO's proxy-loss saliency
# The prompt positions whose prediction PIO's proxy loss reads: the library's current rule, the last
# ``prediction_tokens`` (2) prompt tokens. The official code reads the 4 positions S-5..S-2 of the
# sequence (the last prompt token excluded): when the library follows it, change this one line (and
# the NMS threshold and the loss reduction below where they change too).
# The official TRIO proxy: the 4 positions before the last prompt token (S-5..S-2); NMS at cos >= 0.8.
PIO_PROXY_POSITIONS = lambda length: torch.arange(length - 5, length - 1)  # noqa: E731
PIO_NMS_THRESHOLD = 0.8


def reference_pio(model, layer_index: int, hidden, layer_kwargs, visual, keep: int):
    """PIO's selection for one row, from the decoder layer's own call: run the layer on its input
    (detached, requiring grad), the model's final norm and LM head at ``PIO_PROXY_POSITIONS``, the
    cross-entropy against their argmax (mean), the gradient norm of each visual token's input, then
    textbook greedy NMS (``checks.reference_nms``). Returns ``(saliency, kept)``."""
    layer = model.model.language_model.layers[layer_index]
    x = hidden.detach().clone().requires_grad_()
    kwargs = {k: layer_kwargs[k] for k in ("attention_mask", "position_ids", "position_embeddings") if k in layer_kwargs}
    with torch.enable_grad():
        out = layer(x, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        logits = model.lm_head(model.model.language_model.norm(y[0, PIO_PROXY_POSITIONS(x.shape[1])])).float()
        loss = F.cross_entropy(logits, logits.argmax(-1))
        (grad,) = torch.autograd.grad(loss, x)
    saliency = grad[0, visual].float().norm(dim=-1)
    kept, _ = reference_nms(saliency, hidden[0, visual].detach().float(), keep, PIO_NMS_THRESHOLD)
    return saliency, kept


def test_pio_saliency_and_selection_equal_a_direct_computation(small_llava8):
    """PIO on a prompt with 12 text tokens after the image: the saliency its stage computes at the
    boundary and the tokens it keeps equal ``reference_pio`` on the same layer input (captured by a
    probe that runs before the reducer's hooks).

    Catches the proxy loss reading other prompt positions than the ones named (e.g. the first text
    tokens after the image instead of the last: earlier tests' prompts had at most 2 text tokens
    after the image, where both readings coincide), a wrong pseudo-label, loss or norm, or an NMS
    applied to other features."""
    from dataclasses import dataclass

    model = small_llava8
    recorded = []

    @dataclass
    class Recording(duet_vlm.SaliencyNMSPrune):
        def score(self, view):
            scores = super().score(view)
            recorded.append(scores)
            return scores

    @dataclass
    class RecordingPIO(duet_vlm.PIO):
        def language_stage(self, geometry=None):
            return Recording(self.threshold, self.proxy_tokens, "next")

    boundary, keep = 4, 8
    inputs = make_inputs(model, suffix=12, seed=14)
    calls = []
    probe = _probe(model.model.language_model.layers[boundary], calls)  # before the reducer: sees its input
    reducer = RecordingPIO(llm_input=32, layers=(boundary,), keep=(keep,))
    try:
        with torch.no_grad(), reducer(model):
            model(**inputs)
    finally:
        probe.remove()
    (args, kwargs) = calls[0]  # the real call; the stage's own run of the layer comes after
    hidden = args[0] if args else kwargs["hidden_states"]
    text = int((inputs["input_ids"] != IMAGE_TOKEN).sum())
    assert hidden.shape[1] == text + 32
    visual = torch.arange(6, 6 + 32)  # <s>, 5 ids, then the 32 visual tokens entering the LLM
    saliency, kept = reference_pio(model, boundary, hidden, kwargs, visual, keep)
    (scores,) = recorded
    torch.testing.assert_close(scores[0, 0], saliency, atol=1e-6, rtol=1e-4)
    assert reducer.stats.stage_kept[0][1][0, 0].tolist() == kept
