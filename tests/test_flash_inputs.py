"""The FlashAttention-2 path without a GPU (issue #37): transformers' own FA2 code runs on the CPU with
only the kernel replaced, and what the runtime hands it is checked.

transformers' ``flash_attention_forward`` and ``_flash_attention_forward`` decide, from the mask and
the position ids a layer receives, which kernel to call and with what: unpadding indices and
cumulative sequence lengths from a 2-D padding mask (``_upad_input``), or from position ids that
look packed (``_is_packed_sequence``, ``prepare_fa_kwargs_from_position_ids``), else the plain
kernel. Here the attention backend ``fa2_reference`` is registered through transformers' own
interfaces (``AttentionInterface``: its FA2 forward, unchanged; ``AttentionMaskInterface``: its FA2
mask builder), and only the kernels that the FA2 code loads are replaced by reference ones written
with SDPA (causal masks aligned bottom-right, as flash-attn >= 2.1 aligns them), which record every
call's inputs. On that backend:

- the unpatched model equals itself under SDPA (the reference kernels are right);
- ``duet-vlm check`` passes under DUET, FastV (original positions: gaps the FA2 code could read as
  packed sequences), VisionZip and PyramidDrop on LLaVA-1.5 and Qwen2.5-VL (M-RoPE): ``full``, a
  padded batch (unpadded with the runtime's 2-D masks) against its rows, per-layer counts, the ideal,
  the generation modes, the model restored;
- call by call, the kernel inputs of a reduced prefill (cumulative sequence lengths, largest
  lengths, query and key shapes) equal those of the unpatched layers fed the kept tokens.

What only a GPU can check: the flash-attn kernels themselves, their bfloat16 numerics and speed.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as fa_utils
from transformers import AttentionInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from duet_vlm.check import check_model
from duet_vlm.check.replay import EntryProbe, Replay

from models import FAMILIES

BACKEND = "fa2_reference"
CALLS: list[dict] = []  # the kernel inputs of every call, in order


def _attend(q, k, v, scale, causal):
    """One sequence, ``(L, H, D)``: SDPA with the kernel's conventions (grouped heads, a causal mask
    aligned bottom-right when there are fewer queries than keys)."""
    heads = q.shape[1]
    k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    mask = None
    if causal:
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)
    return out.transpose(0, 1)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    assert tuple(window_size) == (-1, -1) and not softcap and not dropout_p and alibi_slopes is None
    CALLS.append({"kernel": "varlen", "cu_q": cu_seqlens_q.tolist(), "cu_k": cu_seqlens_k.tolist(),
                  "max_q": int(max_seqlen_q), "max_k": int(max_seqlen_k), "causal": causal})
    pieces = [_attend(q[a:b], k[c:d], v[c:d], softmax_scale, causal)
              for a, b, c, d in zip(cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:])]
    return torch.cat(pieces)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    assert tuple(window_size) == (-1, -1) and not softcap and not dropout_p and alibi_slopes is None
    batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    CALLS.append({"kernel": "dense", "cu_q": [b * lq for b in range(batch + 1)], "cu_k": [b * lk for b in range(batch + 1)],
                  "max_q": lq, "max_k": lk, "causal": causal})
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(batch)])


@pytest.fixture(scope="module", autouse=True)
def reference_backend():
    """``fa2_reference``: transformers' FA2 forward and mask, with the reference kernels loaded as the
    FA2 code loads a kernel (its module's cache of the loaded implementation)."""
    AttentionInterface.register(BACKEND, flash_attention_forward)
    AttentionMaskInterface.register(BACKEND, flash_attention_mask)
    names = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
             "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")
    saved = {name: getattr(fa_utils, name) for name in names}
    loaded = {
        "_loaded_implementation": BACKEND, "_flash_fn": flash_attn_func, "_flash_varlen_fn": flash_attn_varlen_func,
        "_flash_with_kvcache_fn": None, "_pad_fn": fa_utils._pad_input, "_unpad_fn": fa_utils._unpad_input,
        "_process_flash_kwargs_fn": fa_utils._lazy_define_process_function(flash_attn_varlen_func),
        "_process_with_kvcache_kwargs_fn": dict,
    }
    for name, value in loaded.items():
        setattr(fa_utils, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(fa_utils, name, value)


def _on_backend(family_name: str):
    """The family's tiny model (a copy, so the shared one keeps SDPA) with every attention on the
    reference FA2 backend, and its batch and rows."""
    import copy

    family = FAMILIES[family_name]
    shared = family.model()
    model = copy.deepcopy(shared)
    model.set_attn_implementation(BACKEND)
    batch = family.batch(model)
    return shared, model, batch, [family.row(batch, b) for b in range(batch["input_ids"].shape[0])]


@pytest.mark.parametrize("family_name", ["llava", "qwen2_5_vl"])
def test_the_reference_kernels_equal_sdpa(family_name):
    shared, model, batch, _ = _on_backend(family_name)
    assert model.config.text_config._attn_implementation == BACKEND
    CALLS.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, shared(**batch).logits, atol=1e-5, rtol=1e-5)
    assert any(call["kernel"] == "varlen" for call in CALLS)  # the padded batch was unpadded


@pytest.mark.parametrize("method", ["duet", "fastv", "visionzip", "pyramiddrop"])
@pytest.mark.parametrize("family_name", ["llava", "qwen2_5_vl"])
def test_check_passes_on_the_fa2_path(family_name, method):
    _, model, batch, rows = _on_backend(family_name)
    report = check_model(model, batch, rows, method, ratio=0.5, rounds=1, new_tokens=3, skip=("timing",))
    failed = [(r.key, r.detail) for r in report.results if r.status == "fail"]
    assert report.ok, failed
    assert report.result("ideal").status == "pass" and report.result("padded").status == "pass"


@pytest.mark.parametrize("method", ["duet", "fastv", "pyramiddrop"])
@pytest.mark.parametrize("family_name", ["llava", "qwen2_5_vl"])
def test_kernel_inputs_equal_the_unpatched_layers_on_the_kept_tokens(family_name, method):
    """The decoder's kernel calls of a reduced prefill, one row, against the replay's (the unpatched
    layers fed the kept tokens): the same kernel inputs, call by call."""
    import duet_vlm

    _, model, _, rows = _on_backend(family_name)
    inputs = rows[0]
    reducer = duet_vlm.make(method, ratio=0.5)
    layers = len(model.model.language_model.layers)
    with reducer(model):
        probe = EntryProbe(model)
        try:
            CALLS.clear()
            with torch.no_grad():
                model(**inputs)
            reduced = CALLS[-layers:]  # the decoder's calls come after the tower's
        finally:
            probe.remove()
    CALLS.clear()
    replay = Replay(model, reducer, inputs, probe)
    ideal = replay.run()
    assert len(CALLS) == layers
    keys = ("cu_q", "cu_k", "max_q", "max_k", "causal")
    assert [{k: c[k] for k in keys} for c in reduced] == [{k: c[k] for k in keys} for c in CALLS]
    torch.testing.assert_close(probe.last, ideal, atol=1e-5, rtol=1e-5)
    lengths = [c["max_q"] for c in CALLS]
    assert lengths[-1] < lengths[0] or method == "visionzip"  # tokens were dropped inside the decoder
