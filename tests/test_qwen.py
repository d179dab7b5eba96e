"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: tiny models of the real transformers classes.

What is checked, for every family and (where it matters) every registered method:
- no-op parity (``full`` is bit-identical) and hooks removed;
- the visual tokens each decoder layer receives equal the items' per-layer stats, and each layer's
  KV cache holds its prefill plus the generated tokens;
- kept tokens keep their 3-D M-RoPE positions (a merged token its anchor's), at the language
  model's entry and after every Stage-B boundary; decoding uses the positions the unreduced model
  uses; a request for renumbered positions is refused with the alternative named;
- a padded batch of images of different sizes (and an image with a video) equals each row alone;
- cached decoding equals recomputation; the first generated token is the reduced prefill's argmax;
- eager equals SDPA; a training forward and backward with labels;
- Stage A's scores equal a reference built from the block's full eager attention map;
- Qwen3-VL's DeepStack features follow the kept set and the merge;
- the reference's Qwen2.5-VL setting (540 + 100, width 4, 14/21 with 0.5/0.25) is reproducible and
  the solver handles any token count.
"""

import sys

import pytest
import torch
from transformers import AttentionInterface

import duet_vlm
from duet_vlm.adapters import Geometry, adapter_for
from duet_vlm.adapters.qwen_vl import received_attention_and_keys

# The tiny models and their prompts live in tests/models.py.
from models import BUDGETED
from models import QWEN_IMAGE as IMAGE
from models import QWEN_MIXED as MIXED
from models import QWEN_VIDEO as VIDEO
from models import make_qwen
from models import qwen_batch as make_batch
from models import qwen_batch_for as batch_for
from models import qwen_row as row_of
from checks import generate_and_check_counts

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
NAMES = BUDGETED  # pixelprune takes no budget: tests/test_pixelprune.py


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request):
    model = make_qwen(request.param)
    with torch.no_grad():  # transformers adds its output-capturing hooks at the first forward
        model(**batch_for(model, MIXED))
    return model


# ----------------------------------------------------------------------------- counts, cache, hooks
@pytest.mark.parametrize("name", NAMES)
def test_layer_counts_and_cache_equal_the_stats(qwen, name):
    items = generate_and_check_counts(qwen, name, row_of(batch_for(qwen, MIXED), MIXED, 0))
    video = [("video", 8, 1)] * 2 if qwen.config.model_type == "qwen3_vl" else [("video", 16, 2)]
    assert [(i.modality, i.tokens, i.units) for i in items] == [("image", 16, 1), *video]


def test_full_is_bit_identical(qwen):
    inputs = batch_for(qwen, MIXED, seed=1)
    with torch.no_grad():
        plain = qwen(**inputs).logits
        with duet_vlm.make("full")(qwen):
            reduced = qwen(**inputs).logits
    assert torch.equal(plain, reduced)


# ----------------------------------------------------------------------------- positions
class Positions:
    """The M-RoPE positions the language model receives, and the RoPE each decoder layer gets."""

    def __init__(self, model):
        lm = model.model.language_model
        self.entry, self.cos = [], {}
        self.handles = [lm.register_forward_pre_hook(self._entry, with_kwargs=True)]
        for index, layer in enumerate(lm.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer(index), with_kwargs=True))

    def _entry(self, module, args, kwargs):
        self.entry.append(kwargs["position_ids"])

    def _layer(self, index):
        def hook(module, args, kwargs):
            self.cos.setdefault(len(self.entry) - 1, {})[index] = kwargs["position_embeddings"][0]

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("name", ["duet", "visionzip", "pool", "fastv", "pyramiddrop", "sparsevlm", "pio"])
def test_kept_tokens_keep_their_3d_positions(qwen, name):
    """At the entry, the reduced sequence's positions are the unreduced ones at the kept slots (a
    merged token at its anchor's); after each boundary, the RoPE of the layer equals the rotary of the
    unreduced positions of the survivors. Decoding steps get the unreduced model's positions."""
    inputs = row_of(batch_for(qwen, MIXED, seed=2), MIXED, 0)
    plain = Positions(qwen)
    with torch.no_grad():
        qwen.generate(**inputs, max_new_tokens=3, do_sample=False)
    plain.remove()
    reducer = duet_vlm.make(name, ratio=0.5)
    handle = reducer.attach(qwen)
    reduced = Positions(qwen)  # registered after the reducer's hooks: sees what they pass on
    try:
        with torch.no_grad():
            qwen.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        reduced.remove()
        handle.remove()
    full = plain.entry[0][-3:, 0]  # (3, L): the M-RoPE rows (generate adds a text row first)
    ids = inputs["input_ids"][0]
    is_visual = (ids == IMAGE) | (ids == VIDEO)
    items = reducer.stats.items
    starts = [int(s) for s in torch.nonzero(is_visual[1:] & ~is_visual[:-1])[:, 0] + 1]
    if is_visual[0]:
        starts.insert(0, 0)
    entry_slots = [start + item.entry_slots.sort().values for start, item in zip(starts, items)]
    kept = torch.cat([torch.nonzero(~is_visual)[:, 0], *entry_slots]).sort().values
    torch.testing.assert_close(reduced.entry[0][-3:, 0], full[:, kept], rtol=0, atol=0)
    rotary = qwen.model.language_model.rotary_emb
    for layer, cos in reduced.cos[0].items():
        survivors = [torch.nonzero(~is_visual)[:, 0]]
        for item, slots in zip(items, entry_slots):
            ids_at = [ids_ for boundary, ids_ in item.stage_ids if boundary <= layer]
            survivors.append(slots[ids_at[-1]] if ids_at else slots)
        positions = full[:, torch.cat(survivors).sort().values][:, None]
        expected, _ = rotary(cos, positions)
        torch.testing.assert_close(cos, expected, rtol=0, atol=1e-6, msg=f"layer {layer}")
    for step in range(1, len(plain.entry)):  # decoding: the positions the unreduced model uses
        assert torch.equal(reduced.entry[step], plain.entry[step]), f"step {step}"


def test_renumbered_positions_are_refused_with_the_alternative(qwen):
    for reducer in (duet_vlm.make("duet", budget=8, positions="contiguous"), duet_vlm.FastV(budget=8, positions="contiguous")):
        with pytest.raises(ValueError, match="positions='original'"):
            reducer.attach(qwen)
    assert duet_vlm.make("duet", budget=8).resolve(adapter_for(qwen).geometry).positions == "original"


# ----------------------------------------------------------------------------- batches, decoding
@pytest.mark.parametrize("name", [n for n in NAMES if n != "full"])
def test_padded_batch_of_different_sizes_equals_rows_alone(qwen, name):
    inputs = batch_for(qwen, MIXED, seed=3)
    reducer = duet_vlm.make(name, ratio=0.5)
    kwargs = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad(), reducer(qwen):
        logits = qwen(**inputs).logits[:, -1]
        tokens = qwen.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
        for b in range(2):
            alone = row_of(inputs, MIXED, b)
            torch.testing.assert_close(logits[b], qwen(**alone).logits[0, -1], atol=1e-4, rtol=1e-4)
            single = qwen.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :]
            assert tokens[b, : len(single)].tolist() == single.tolist(), f"row {b}"


@pytest.mark.parametrize("name", ["duet", "visionzip", "pool", "fastv", "pio"])
def test_cached_decoding_equals_recomputation(qwen, name):
    """The first generated token is the reduced prefill's argmax. Under vision-side methods (whose
    kept set does not depend on the text that follows) greedy decoding with the per-layer caches
    equals recomputing the whole sequence at every step; language-side methods re-select when the
    prompt grows, so only the first step is comparable for them."""
    inputs = row_of(batch_for(qwen, MIXED, seed=4), MIXED, 1)
    reducer = duet_vlm.make(name, ratio=0.5)
    with torch.no_grad(), reducer(qwen):
        prefill = qwen(**inputs).logits[0, -1]
        out = qwen.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert int(new[0]) == int(prefill.argmax()), "the first token is the reduced prefill's argmax"
    if name in ("visionzip", "pool"):
        with torch.no_grad(), reducer(qwen):
            again = qwen.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
        assert again[0].tolist() == out[0].tolist()


@pytest.mark.parametrize(
    "family, name", [("qwen2_5_vl", n) for n in ("duet", "fastv", "sparsevlm", "visionzip")]
    + [("qwen2_vl", "duet"), ("qwen3_vl", "duet")],
)
def test_eager_equals_sdpa(family, name):
    inputs = make_batch(MIXED, seed=5, frames_apart=family == "qwen3_vl")
    outputs = []
    for attn in ("sdpa", "eager"):
        model = make_qwen(family, attn=attn)
        with torch.no_grad(), duet_vlm.make(name, ratio=0.5)(model):
            outputs.append(model(**inputs).logits)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(outputs[0][valid], outputs[1][valid], atol=1e-4, rtol=1e-4)


def test_training_forward_and_backward(qwen):
    inputs = batch_for(qwen, MIXED, seed=6)
    ids = inputs["input_ids"]
    labels = ids.masked_fill((ids == IMAGE) | (ids == VIDEO) | (inputs["attention_mask"] == 0), -100)
    last = qwen.model.language_model.layers[-1].mlp.down_proj.weight
    qwen.zero_grad(set_to_none=True)
    try:
        with duet_vlm.make("duet", ratio=0.5)(qwen):
            loss = qwen(**inputs, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert last.grad is not None and last.grad.abs().sum() > 0
    finally:
        qwen.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- Stage A scores
_MAPS: list[torch.Tensor] = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention, keeping the full attention map of each call."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    output, weights = eager(module, query, key, value, attention_mask, **kwargs)
    _MAPS.append(weights.detach())
    return output, weights


AttentionInterface.register("duet_test_recording", _recording_attention)


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_a_scores_equal_the_full_attention_map(family):
    """Scores from the block's projections in query chunks equal the attention each patch receives
    in the block's full eager map (mean over heads, sum over queries, within its image), averaged
    over its 2x2 group and put in the merger's order; keys likewise averaged."""
    model = make_qwen(family)
    visual = model.model.visual
    visual.config._attn_implementation = "duet_test_recording"
    inputs = make_batch([[("image", 8, 12), ("image", 4, 8)]], seed=7)
    adapter = adapter_for(model)
    captured = {}

    def before(module, args, kwargs):
        _MAPS.clear()
        captured.update(x=args[0], **kwargs)

    block = adapter.towers["image"]
    handles = [
        block.register_forward_pre_hook(before, with_kwargs=True),
        block.register_forward_hook(lambda m, a, o: captured.update(maps=list(_MAPS))),
    ]
    with torch.no_grad():
        visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    for handle in handles:
        handle.remove()
    maps = captured["maps"]  # the score block's calls: one per image (its attention segments)
    assert len(maps) == inputs["image_grid_thw"].shape[0]
    received = torch.cat([m[0].mean(dim=0).sum(dim=0) for m in maps])  # (patches,) in the block's order
    mine, keys = received_attention_and_keys(
        adapter.towers["image"], captured["x"], captured["cu_seqlens"], captured["position_embeddings"], chunk=7
    )
    torch.testing.assert_close(mine, received.float(), rtol=0, atol=1e-5)
    grid = inputs["image_grid_thw"]
    order = adapter.merged_order(grid)
    expected = received.view(-1, 4).mean(dim=1)
    expected = expected[order] if order is not None else expected
    from duet_vlm.adapters import Capture

    capture = Capture(captured["x"], captured["x"], (captured["x"].shape[0],), (
        {"layer_kwargs": {"cu_seqlens": captured["cu_seqlens"], "position_embeddings": captured["position_embeddings"]},
         "entry_args": (inputs["pixel_values"], grid), "entry_kwargs": {}},
    ))
    signals = adapter.vision_signals(capture, "image")
    scores, merged_keys, starts = signals.scores, signals.keys, signals.starts
    torch.testing.assert_close(scores, expected.float(), rtol=0, atol=1e-5)
    assert starts == [0, 24]
    key_groups = keys.view(-1, 4, keys.shape[-1]).mean(dim=1)
    torch.testing.assert_close(merged_keys, key_groups[order] if order is not None else key_groups)


def test_window_order_is_the_mergers():
    """Qwen2.5-VL runs its blocks on window-permuted groups; ``merged_order`` maps them back the way
    the model maps its merger output (checked on the block output: merged in our order it equals the
    model's pooled output)."""
    model = make_qwen("qwen2_5_vl")
    visual = model.model.visual
    inputs = make_batch([[("image", 12, 16)]], seed=8)
    grid = inputs["image_grid_thw"]
    last = {}
    handle = visual.blocks[-1].register_forward_hook(lambda m, a, o: last.update(y=o))
    with torch.no_grad():
        pooled = visual(inputs["pixel_values"], grid_thw=grid).pooler_output
        merged = visual.merger(last["y"])
    handle.remove()
    order = adapter_for(model).merged_order(grid)
    assert not torch.equal(order, torch.arange(len(order)))  # the test image spans several windows
    torch.testing.assert_close(merged[order], pooled)


# ----------------------------------------------------------------------------- DeepStack
def test_deepstack_features_follow_the_kept_set_and_the_merge():
    """Under a vision-side method, Qwen3-VL's reduced run equals the unpatched text model fed the
    reduced embeddings and, at the kept visual positions, DeepStack features reduced by the same
    selection and merge (recomputed here from the stats' roles)."""
    model = make_qwen("qwen3_vl")
    inputs = row_of(make_batch(MIXED, seed=9), MIXED, 1)
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    deepstack, mask = seen["deepstack_visual_embeds"], seen["visual_pos_masks"]
    embeds, positions = seen["inputs_embeds"], seen["position_ids"]
    reducer = duet_vlm.make("duet", budget=16, layers=())  # Stage A only: 24 -> 16 merged tokens
    with torch.no_grad(), reducer(model):
        reduced_logits = model(**inputs).logits
    item = reducer.stats.items[0]
    roles = reducer.stats.vision_roles
    dominant, anchors, members = roles["dominant"][0], roles["anchors"][0], roles["members"][0]
    visual = mask[0].nonzero()[:, 0]

    def merge(features):  # (24, D) -> the kept tokens in slot order, contextual = anchor + mean(members)
        out = {int(i): features[i] for i in dominant}
        keys = torch.nn.functional.normalize(reducer_keys.float(), dim=-1)
        assignment = (keys[members] @ keys[anchors].T).argmax(dim=-1)
        for a, anchor in enumerate(anchors):
            chosen = members[assignment == a]
            out[int(anchor)] = features[anchor] + (features[chosen].mean(0) if len(chosen) else 0)
        return torch.stack([out[k] for k in sorted(out)])

    adapter = adapter_for(model)
    captured = {}
    handle = adapter.towers["image"].register_forward_pre_hook(lambda m, a, k: captured.update(x=a[0], **k), with_kwargs=True)
    with torch.no_grad():
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    handle.remove()
    from duet_vlm.adapters import Capture

    capture = Capture(captured["x"], captured["x"], (captured["x"].shape[0],), (
        {"layer_kwargs": {"cu_seqlens": captured["cu_seqlens"], "position_embeddings": captured["position_embeddings"]},
         "entry_args": (inputs["pixel_values"], inputs["image_grid_thw"]), "entry_kwargs": {}},
    ))
    reducer_keys = adapter.vision_signals(capture, "image").keys
    kept_slots = visual[sorted(int(i) for i in torch.cat([dominant, anchors]))]
    text = (~mask[0]).nonzero()[:, 0]
    order = torch.cat([text, kept_slots]).sort().values
    new_embeds = embeds[:, order].clone()
    new_mask = torch.zeros(1, len(order), dtype=torch.bool)
    new_mask[0, torch.isin(order, kept_slots)] = True
    new_embeds[new_mask] = merge(embeds[0, visual])
    reference = lm(
        inputs_embeds=new_embeds, position_ids=positions[..., order], attention_mask=torch.ones(1, len(order)),
        visual_pos_masks=new_mask, deepstack_visual_embeds=[merge(d) for d in deepstack], use_cache=False,
    ).last_hidden_state
    logits = model.lm_head(reference)[0, -1]
    assert item.tokens_per_layer[0] == 16
    torch.testing.assert_close(reduced_logits[0, -1], logits, atol=1e-5, rtol=1e-5)


def test_a_stage_running_a_layer_gets_its_deepstack_features(monkeypatch):
    """PIO runs the boundary's layer itself to take gradients through it. Inside Qwen3-VL's DeepStack
    layers that layer's output includes the visual features the model adds after it, as in the
    unreduced model (where it is the next layer's input), for a padded batch too."""
    from duet_vlm.methods.pio import SaliencyNMSPrune

    model = make_qwen("qwen3_vl")
    rows = [[("image", 8, 8)], [("image", 12, 8)]]
    batch = batch_for(model, rows)
    layers = model.model.language_model.layers
    expected = {}
    handle = layers[2].register_forward_pre_hook(lambda m, a, k: expected.update(x=k.get("hidden_states", a[0] if a else None)),
                                                 with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()

    seen = []
    original = SaliencyNMSPrune.score

    def recording(self, view):
        with torch.no_grad():
            seen.append((view.layer_index, view.run_layer(view.hidden_states)))
        return original(self, view)

    monkeypatch.setattr(SaliencyNMSPrune, "score", recording)
    reducer = duet_vlm.make("pio", budget=8, vision=False, layers=(1,), keep=(4,))
    with torch.no_grad(), reducer(model):
        model(**batch)
    # one boundary, nothing dropped before it; items of different sizes are ranked row by row
    assert [index for index, _ in seen] == [1, 1]
    for row, (_, output) in enumerate(seen):
        valid = batch["attention_mask"][row].bool()
        torch.testing.assert_close(output[0, valid], expected["x"][row, valid], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- budgets and defaults
def test_reference_qwen25_setting_is_reproducible():
    """540 dominant + 100 contextual tokens, width 4, boundaries after layers 14 and 21 keeping 0.5
    and 0.25 on Qwen2.5-VL-7B's 28 layers, for an image larger than 640 tokens; smaller images are
    left whole by Stage A."""
    reducer = duet_vlm.Duet.qwen_reference()
    big = Geometry(28, 1196, (26, 46), False, rope="mrope")  # a 1280x720 image after Qwen's resize
    plan = reducer.resolve(big)
    assert plan.schedule.llm_input == 640 and plan.schedule.boundaries == ((14, 320), (21, 160))
    assert plan.vision.contextual == 100 and plan.vision.cluster_width == 4 and plan.positions == "original"
    small = Geometry(28, 256, (16, 16), False, rope="mrope")  # a 448x448 image
    plan = reducer.resolve(small)
    assert plan.schedule.llm_input == 256 and plan.vision is None and plan.schedule.boundaries == ((14, 128), (21, 64))


def test_budgets_of_images_of_any_size_in_one_batch():
    """A ratio reduces each image to its share; a budget is met by every image larger than it."""
    for tokens, grid in ((1196, (26, 46)), (256, (16, 16)), (30, (5, 6))):
        geometry = Geometry(28, tokens, grid, False, rope="mrope")
        for name in NAMES:
            if name == "full":
                continue
            plan = duet_vlm.make(name, ratio=0.25).resolve(geometry)
            assert abs(plan.schedule.average - round(0.25 * tokens)) <= 1, (name, tokens)
            if tokens == 256:
                assert duet_vlm.make(name, budget=64).resolve(geometry).schedule.average == pytest.approx(64, abs=1)


# ----------------------------------------------------------------------------- duet-vlm run
def _image_only_processor():
    """A Qwen2-VL processor built offline: word-level tokenizer, the PIL image processor. Its video
    processor needs torchvision, which this machine lacks, so the processor is the image-only
    subclass below (``Qwen2VLProcessor``'s own ``__call__``, placeholders and ``mm_token_type_ids``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwenProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    special = ["<pad>", "<s>", "</s>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    words = special + ["user:", "assistant:"] + [f"w{i}" for i in range(99 - len(special) - 2)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    template = (
        "{% for message in messages %}{{ message['role'] }}: {% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
        "{% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 64, patch_size=14, merge_size=2)
    return ImageOnlyQwenProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)


def test_run_on_a_local_qwen_checkpoint(tmp_path, monkeypatch):
    """``duet-vlm run`` loads a Qwen2.5-VL checkpoint from a path, answers with all tokens and under
    DUET, and draws the overlay on the image's own token grid (a 200x120 image: 4x7 merged tokens,
    no CLS)."""
    from PIL import Image
    from transformers import AutoProcessor
    from typer.testing import CliRunner

    import duet_vlm.compare
    from duet_vlm.cli import app

    make_qwen("qwen2_5_vl").save_pretrained(tmp_path / "model")
    processor = _image_only_processor()
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *args, **kwargs: processor)
    drawn = {}
    draw = duet_vlm.compare.draw_overlay

    def record(image, stats, grid, path, title="", has_cls=True):
        drawn.update(grid=grid, has_cls=has_cls, kept=stats.vision_kept)
        return draw(image, stats, grid, path, title, has_cls)

    monkeypatch.setattr(duet_vlm.compare, "draw_overlay", record)
    Image.new("RGB", (200, 120), (200, 30, 30)).save(tmp_path / "red.png")
    result = CliRunner().invoke(app, [
        "run", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "red.png"), "--prompt", "w3 w4 ?",
        "--method", "duet", "--ratio", "0.5", "--max-new-tokens", "2", "--rounds", "1",
        "--overlay", str(tmp_path / "overlay.png"),
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "duet ratio 0.5" in " ".join(result.output.split())
    assert drawn["grid"] == (4, 7) and drawn["has_cls"] is False
    assert int(drawn["kept"].max()) < 28 and (tmp_path / "overlay.png").stat().st_size > 5_000


@pytest.mark.parametrize("family", FAMILIES)
def test_a_manual_decoding_loop_without_mask_gets_the_unreduced_positions(family):
    """``model(next_token, past_key_values=cache)`` with neither positions nor a mask: Qwen numbers
    the step from the cache's length, which the reduction shortened; the reducer supplies the
    unreduced sequence's mask, so the step gets the unreduced model's positions."""
    model = make_qwen(family)
    inputs = row_of(batch_for(model, MIXED, seed=10), MIXED, 1)
    inputs.pop("attention_mask")

    def loop(reducer):
        probe = []
        with torch.no_grad(), reducer(model):
            handle = model.model.language_model.register_forward_pre_hook(
                lambda m, a, k: probe.append(k["position_ids"]), with_kwargs=True
            )
            try:
                out = model(**inputs, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                for _ in range(2):
                    out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
            finally:
                handle.remove()
        return probe

    plain, reduced = loop(duet_vlm.make("full")), loop(duet_vlm.make("visionzip", ratio=0.5))
    assert len(reduced) == 3
    for step in (1, 2):
        assert torch.equal(reduced[step], plain[step]), f"step {step}"


def test_stage_a_cost_benchmark_runs_on_a_small_tower():
    """The benchmark behind the README's Stage A cost: structure and the derived shares (no timing asserted)."""
    from duet_vlm.bench.vision import stage_a_cost

    result = stage_a_cost(depth=1, grid=(8, 8), rounds=1)
    assert result["image_patches"] == 64 and result["merged_tokens"] == 16 and result["tower"]["depth"] == 1
    assert result["tower_s"] > 0 and result["stage_a_s"] > 0
    assert result["share_of_32_block_tower"] == pytest.approx(result["stage_a_in_tower_blocks"] / 32)


@pytest.mark.parametrize("slices, dtype, warns", [(300, torch.bfloat16, True), (300, torch.float32, False),
                                                  (8, torch.bfloat16, False)])
def test_qwen2_5_vl_warns_when_half_precision_seconds_move_its_time_positions(slices, dtype, warns):
    """transformers' Qwen2.5-VL numbers a video's time positions in ``second_per_grid_ts``'s dtype: cast
    to bfloat16 with the rest of a processor's output, a 300-slice video one time position apart per
    slice (the tiny config's 4 tokens a second, 0.25 s a slice) has its odd positions past 256 rounded
    (unreduced too). The adapter says so, with how many differ from float32, exactly when some
    do: not in float32, not for a video whose positions bfloat16 holds exactly."""
    import warnings

    from duet_vlm.adapters.qwen_vl import rounded_time_positions
    from models import QWEN_VIDEO, make_qwen

    model = make_qwen("qwen2_5_vl", layers=2)
    ids = torch.tensor([[5, 6] + [QWEN_VIDEO] * slices + [7, 8]])  # 2x2 patches a slice: one token each
    kwargs = dict(video_grid_thw=torch.tensor([[slices, 2, 2]]), second_per_grid_ts=torch.tensor([0.25], dtype=dtype),
                  mm_token_type_ids=2 * (ids == QWEN_VIDEO).long(), attention_mask=torch.ones_like(ids))
    adapter = adapter_for(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = adapter.find_items(ids, kwargs)
    assert [item.length for item in items] == [slices]
    messages = [str(w.message) for w in caught if "second_per_grid_ts" in str(w.message)]
    differing = rounded_time_positions(model.model, ids, kwargs)[0] if dtype != torch.float32 else 0
    assert bool(messages) == warns == (differing > 0)
    if warns:
        assert f"{differing} of this prompt's {3 * ids.shape[1]} positions" in messages[0]
