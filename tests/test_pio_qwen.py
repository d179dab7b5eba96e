"""PIO on Qwen2.5-VL follows the official Qwen path (``qwen/model/qwen2_5_vl_custom.py`` and
``qwen2_5_vl_utils.py`` of ``ocy1/TRIO`` ``ec85d99``), checked against an independent reference of the
same rules built from the vision blocks' own eager attention maps:

- the scan reads the first full-attention block ("local") and the last block ("global"): attention
  each merged token receives (heads summed, queries averaged, the 2x2 merge unit averaged, put back
  in the merger's order); half the tokens by ``window_selection`` (windows of 4 merged tokens, a cap
  of ceil(k / windows) per window, best first), the rest by the global map's top-k after zeroing
  them; every other merged token averaged into its cosine-nearest kept one;
- the probe of the proxy loss re-runs the boundary layer itself; the kept count is int(0.333 * n).
"""

import math
import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

import duet_vlm

from models import QWEN_IMAGE, make_qwen, qwen_batch

_MAPS: list[tuple[int, torch.Tensor]] = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    eager = sys.modules[type(module).__module__].eager_attention_forward
    output, weights = eager(module, query, key, value, attention_mask, **kwargs)
    _MAPS.append((id(module), weights.detach()))
    return output, weights


AttentionInterface.register("duet_test_pio_recording", _recording_attention)


def _keeper(store):
    def keep(module, args, kwargs):
        store.setdefault("embeds", kwargs["inputs_embeds"].detach().clone())

    return keep


def _received(block, maps, merge_unit=4):
    """Per block-order token: heads summed, queries averaged within its attention segment."""
    scores = torch.cat([weights[0].sum(dim=0).mean(dim=0) for owner, weights in maps if owner == id(block.attn)])
    return scores.view(-1, merge_unit).mean(dim=1)


def _window_selection(scores, grid_hw, count, window=4):
    """The official ``window_selection``, written out again."""
    h, w = grid_hw
    windows_h, windows_w = h // window, w // window
    limit = math.ceil(count / (windows_h * windows_w))
    counter, chosen = {}, []
    for index in torch.argsort(scores, descending=True).tolist():
        cell = (min(index // w // window, windows_h - 1), min(index % w // window, windows_w - 1))
        if counter.get(cell, 0) < limit:
            counter[cell] = counter.get(cell, 0) + 1
            chosen.append(index)
        if len(chosen) >= count:
            break
    return torch.tensor(chosen)


def _token_merging(embeds, keep):
    mask = torch.zeros(len(embeds), dtype=torch.bool)
    mask[keep] = True
    retained, rest = embeds[mask], embeds[~mask]
    nearest = (F.normalize(rest, dim=-1) @ F.normalize(retained, dim=-1).T).argmax(dim=1)
    merged = retained.clone()
    merged.scatter_add_(0, nearest[:, None].expand(-1, embeds.shape[1]), rest)
    count = torch.zeros(len(retained), dtype=torch.int).scatter_add_(0, nearest, torch.ones_like(nearest, dtype=torch.int))
    return merged / (1 + count[:, None])


def test_pio_on_qwen2_5_vl_follows_the_official_qwen_rules():
    model = make_qwen("qwen2_5_vl", layers=6)
    visual = model.model.visual
    inputs = qwen_batch([[("image", 16, 16)]], seed=3)  # 8 x 8 merged tokens: 2 x 2 windows of 4
    grid = inputs["image_grid_thw"]
    start = int((inputs["input_ids"][0] == QWEN_IMAGE).nonzero()[0])

    # The reference: the plain model's eager vision maps and merger output.
    visual.config._attn_implementation = "duet_test_pio_recording"
    _MAPS.clear()
    entry = {}
    handle = model.model.language_model.register_forward_pre_hook(_keeper(entry), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    visual.config._attn_implementation = "sdpa"
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid, 2, visual.config.window_size, visual.config.patch_size)
    order = torch.argsort(window_index)
    local_block, global_block = visual.blocks[visual.fullatt_block_indexes[0]], visual.blocks[-1]
    local = _received(local_block, _MAPS)[order]
    global_ = _received(global_block, _MAPS)[order].clone()
    tokens = local.shape[0]
    reducer = duet_vlm.PIO(vision_ratio=0.25, layers=(3,), ratios=(0.333,))
    n = int(0.25 * tokens)
    keep_local = _window_selection(local, (8, 8), n // 2)
    global_[keep_local] = 0
    keep = torch.cat([keep_local, global_.topk(n - n // 2).indices]).sort().values
    image = entry["embeds"][0, start : start + tokens]
    expected = _token_merging(image, keep)

    # PIO under the reducer, recording which decoder layer the probe ran.
    probes = []

    def probing(index, forward):
        # around the layer's forward, not a module hook: the probe calls forward itself (so that
        # transformers' output recorders do not take it for one of the model's layer calls)
        def wrapper(*args, **kwargs):
            if torch.is_grad_enabled():
                probes.append(index)
            return forward(*args, **kwargs)

        return wrapper

    handle = reducer.attach(model)
    seen = {}
    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        layer.forward = probing(i, layer.forward)
    hooks = [model.model.language_model.register_forward_pre_hook(_keeper(seen), with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            del layer.forward
        handle.remove()
    stats = reducer.stats
    assert stats.vision_kept[0].tolist() == keep.tolist()
    kept_embeds = seen["embeds"][0, start : start + n]
    torch.testing.assert_close(kept_embeds, expected, atol=1e-5, rtol=1e-5)
    assert probes == [2]  # boundary after layer 3: the official Qwen probe re-runs layer 3 (0-based 2)
    assert stats.tokens_per_layer == [n] * 3 + [int(0.333 * n)] * 3
