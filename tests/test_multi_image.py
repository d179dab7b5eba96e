"""Two images in one prompt: every image reaches the language model, each through its own kept slots.

The runtime keeps, per image, the first ``k`` of its 576 placeholder slots (the projector output is
padded with zeros after the ``k`` real tokens of each image). Taking the ``2k`` slots from the
flattened row instead keeps image 1's real tokens plus its zero padding, and image 2 vanishes
without any error. These tests would catch that, and any Stage-B bookkeeping that reads the wrong
image's positions.
"""

import pytest
import torch

import duet_vlm

from models import IMAGE_TOKEN, make_inputs

IMAGES = 2
BUDGET = 64
METHODS = ["duet", "visionzip", "fastv", "pyramiddrop", "random", "pool", "pio", "sparsevlm"]


@pytest.fixture(scope="module")
def two_images(llava15):
    """One prompt ``<s> p p IMG*576 p p IMG*576 s*6`` and the same prompt with either image's pixels replaced."""
    inputs = make_inputs(llava15, images_per_row=IMAGES, prefix=2, suffix=6, seed=21)
    other = torch.randn(inputs["pixel_values"].shape[1:], generator=torch.Generator().manual_seed(99))
    changed = []
    for image in range(IMAGES):
        variant = dict(inputs)
        variant["pixel_values"] = inputs["pixel_values"].clone()
        variant["pixel_values"][image] = other
        changed.append(variant)
    return inputs, changed


def _image_runs(ids: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of image placeholders in ``ids``."""
    runs, start = [], None
    for i, token in enumerate(ids + [None]):
        if token == IMAGE_TOKEN and start is None:
            start = i
        elif token != IMAGE_TOKEN and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _last_logits(model, reducer, inputs):
    with torch.no_grad(), reducer(model):
        return model(**inputs).logits[0, -1]


@pytest.mark.parametrize("name", METHODS)
def test_each_image_changes_the_output(llava15, two_images, name):
    """Replacing only image 2's pixels (or only image 1's) changes the logits, for every method.

    Catches: kept slots taken from the flattened row (image 2 silently ignored), a vision stage fed
    image 1's features twice, Stage B dropping one image's tokens entirely.
    """
    inputs, changed = two_images
    base = _last_logits(llava15, duet_vlm.make(name, budget=BUDGET), inputs)
    for image, variant in enumerate(changed):
        other = _last_logits(llava15, duet_vlm.make(name, budget=BUDGET), variant)
        assert (other - base).abs().max() > 1e-3, f"{name}: image {image + 1}'s pixels do not reach the output"


@pytest.mark.parametrize(
    "make_reducer",
    [lambda: duet_vlm.VisionZip(budget=BUDGET), lambda: duet_vlm.Duet(budget=BUDGET, layers=())],
    ids=["visionzip", "duet-stage-a"],
)
def test_vision_only_reduction_equals_the_plain_model_on_shorter_images(llava15, two_images, make_reducer):
    """A vision-only method (contiguous positions) ≡ the unpatched model given ``k`` placeholders per image.

    The plain model is fed the reducer's own projected tokens (the projector's last call: ``k`` per
    image) in a prompt whose images have ``k`` tokens each. Every position is compared, at
    the slot where the runtime puts it (the state of each kept token sits just before the next kept
    token's original slot). Catches wrong kept slots per image, wrong positions, wrong masks.
    """
    inputs, _ = two_images
    reducer = make_reducer()
    captured = {}
    handle = reducer.attach(llava15)
    probe = llava15.model.multi_modal_projector.register_forward_hook(  # its last call projects the kept tokens
        lambda module, args, output: captured.__setitem__("projected", output.detach().clone())
    )
    try:
        with torch.no_grad():
            reduced = llava15(**inputs).logits[0]
    finally:
        probe.remove()
        handle.remove()
    k = reducer.stats.llm_input_tokens
    assert reducer.stats.tokens_per_layer == [k] * 32
    projected = captured["projected"]
    assert projected.shape == (IMAGES, k, projected.shape[-1])  # the stage's k tokens per image, projected

    ids = inputs["input_ids"][0].tolist()
    runs = _image_runs(ids)
    assert len(runs) == IMAGES
    short_ids, kept_slots, short_image_starts, cursor = [], [], [], 0
    for start, end in runs:
        short_ids += ids[cursor:start]
        kept_slots += list(range(cursor, start)) + list(range(start, start + k))
        short_image_starts.append(len(short_ids))
        short_ids += [IMAGE_TOKEN] * k
        cursor = end
    short_ids += ids[cursor:]
    kept_slots += list(range(cursor, len(ids)))
    embeds = llava15.get_input_embeddings()(torch.tensor([short_ids])).detach()
    for image, start in enumerate(short_image_starts):
        embeds[0, start : start + k] = projected[image, :k]
    with torch.no_grad():
        shorter = llava15(inputs_embeds=embeds).logits[0]

    torch.testing.assert_close(reduced[-1], shorter[-1], atol=1e-5, rtol=1e-5)
    targets = [slot - 1 for slot in kept_slots[1:]] + [len(ids) - 1]
    torch.testing.assert_close(reduced[targets], shorter, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["fastv", "pyramiddrop", "duet", "pio"])
def test_first_boundary_gathers_each_images_own_survivors(llava15, two_images, name):
    """The input of the first layer after a boundary is exactly the previous layer's output at the text
    positions plus, per image, the tokens ``stats.stage_kept`` names (in order), from that image's block.

    Catches a Stage-B gather that reads image 1's positions for image 2 (or the flattened row), which
    a logits check alone can miss for language-side methods (text already saw image 2 in earlier layers).
    """
    inputs, _ = two_images
    reducer = duet_vlm.make(name, budget=BUDGET)
    layers = llava15.model.language_model.layers
    outputs, inputs_seen = {}, {}  # per layer; a stage that runs a layer itself comes first: last call wins
    handle = reducer.attach(llava15)
    probes = [
        layer.register_forward_hook(
            lambda m, a, out, i=i: outputs.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach())
        )
        for i, layer in enumerate(layers)
    ] + [
        layer.register_forward_pre_hook(  # after the reducer's hooks: sees the pruned sequence
            lambda m, a, kw, i=i: inputs_seen.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach()),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            llava15(**inputs)
    finally:
        for probe in probes:
            probe.remove()
        handle.remove()
    boundary = reducer.stats.stage_kept[0][0]
    seen = {"before": outputs[boundary - 1], "after": inputs_seen[boundary]}
    k = reducer.stats.llm_input_tokens
    layer, kept = reducer.stats.stage_kept[0]
    assert kept.shape[:2] == (1, IMAGES) and kept.shape[-1] > 0
    assert kept[0, 0].tolist() != kept[0, 1].tolist() or k == kept.shape[-1]

    # The entry sequence: text tokens, and k visual tokens per image where its 576 placeholders were.
    ids = inputs["input_ids"][0].tolist()
    entry_visual, survivors, cursor, length = [], [], 0, 0
    for start, end in _image_runs(ids):
        survivors += range(length, length + start - cursor)
        length += start - cursor
        entry_visual.append(torch.arange(length, length + k))
        length += k
        cursor = end
    survivors += range(length, length + len(ids) - cursor)
    length += len(ids) - cursor
    assert seen["before"].shape[1] == length
    for image in range(IMAGES):
        survivors += entry_visual[image][kept[0, image]].tolist()
    expected = seen["before"][0, sorted(survivors)]
    assert seen["after"].shape[1] == len(survivors)
    assert torch.equal(seen["after"][0], expected)
