"""The transformers releases duet-vlm supports, and what differs between them (``duet_vlm.compat``).

CI runs the default suite on the newest release the range admits and on its oldest, and this file
on the releases either side of every other boundary ``compat`` names (``.ci/run``); these tests check, on whichever release is installed, that what ``compat`` says about
it is what that release does: the cache keyword its forwards take, and the families it can run.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import masking_utils

import duet_vlm
from duet_vlm import compat

from checks import hook_ids, release_needed
from models import FAMILIES

ROOT = Path(__file__).resolve().parent.parent


def test_the_declared_range_is_said_once_and_admits_the_installed_release():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = next(re.sub(r"^transformers", "", spec) for spec in dependencies if spec.startswith("transformers"))
    assert SpecifierSet(declared) == SpecifierSet(compat.SUPPORTED)
    assert transformers.__version__ in SpecifierSet(compat.SUPPORTED)
    # at least three minor releases, as users of a library beside their stack expect
    floor = Version(re.search(r">=([\d.]+)", compat.SUPPORTED).group(1))
    ceiling = Version(re.search(r"<([\d.]+)", compat.SUPPORTED).group(1))
    assert ceiling.minor - floor.minor >= 3 and ceiling.major == floor.major


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "qwen3_5", "gemma3", "internvl"])
def test_the_cache_keyword_is_the_one_the_installed_forwards_take(name):
    """``compat.CACHE`` against the installed release's own signatures: the language model's forward,
    each decoder layer's, and the mask helpers' (5.24 renamed ``past_key_values`` to ``cache``)."""
    model = FAMILIES[name].model()
    language_model = duet_vlm.adapters.adapter_for(model).language_model
    assert compat.CACHE in inspect.signature(language_model.forward).parameters
    for layer in language_model.layers:
        assert compat.CACHE in inspect.signature(layer.forward).parameters
    for helper in (masking_utils.create_causal_mask, masking_utils.create_sliding_window_causal_mask):
        assert compat.CACHE in inspect.signature(helper).parameters


def test_the_cache_is_read_under_either_name():
    cache = object()
    assert compat.cache_of({compat.CACHE: cache}) is cache
    assert compat.cache_of({"past_key_values": cache}) is cache  # a caller may still pass the old name
    assert compat.cache_of({}) is None
    assert compat.with_cache(cache) == {compat.CACHE: cache}


def test_a_family_the_installed_release_cannot_run_is_refused_at_attach(monkeypatch):
    """A family listed in ``compat.FAMILY_NEEDS`` (none today) is refused at attach on an older
    release, naming the release it needs and the pip line, and no hook is left behind."""
    model = FAMILIES["gemma4"].model()
    hooks = hook_ids(model)
    monkeypatch.setitem(compat.FAMILY_NEEDS, "gemma4", ("99.1", "a feature"))
    with pytest.raises(TypeError, match=r"transformers 99\.1 or newer \(a feature\).*pip install 'transformers>=99\.1,<"):
        duet_vlm.make("fastv", ratio=0.5).attach(model)
    assert hook_ids(model) == hooks


@pytest.mark.parametrize("shared, types", [
    (2, ["sliding_attention", "full_attention"] * 3),
    (3, ["sliding_attention", "sliding_attention", "full_attention"] * 2),
    (0, ["sliding_attention", "full_attention"] * 3),
    (6, ["sliding_attention", "full_attention"] * 3),
])
def test_gemma4_kv_sharing_modes_are_each_layers_own_part(shared, types):
    """``compat.kv_sharing_modes`` (the config's from transformers 5.23, the layers' rule before) says
    what each attention layer of the installed release does: reuse where it is a KV-shared layer,
    store where it stores its keys and values for them (the layers' own rule before 5.23; on 5.23.0 a
    configuration with no shared layer stores nothing, and one whose every layer reuses is refused)."""
    from transformers import Gemma4TextConfig, Gemma4TextModel

    config = Gemma4TextConfig(num_hidden_layers=6, num_kv_shared_layers=shared, layer_types=types, hidden_size=32,
                              intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              global_head_dim=16, vocab_size=64, hidden_size_per_layer_input=8,
                              vocab_size_per_layer_input=64)
    try:
        layers = Gemma4TextModel(config).layers
    except ValueError as refused:  # 5.23.0 refuses a configuration whose every layer reuses: nothing to compare
        pytest.skip(f"transformers {transformers.__version__} refuses this configuration: {refused}")
    parts = [("reuse" if layer.self_attn.is_kv_shared_layer else "store" if layer.self_attn.store_full_length_kv
              else None) for layer in layers]
    assert compat.kv_sharing_modes(config) == parts
    if not isinstance(getattr(type(config), "kv_sharing_modes", None), property):  # the rule compat applies there
        assert compat.layer_rule_kv_sharing_modes(config) == parts
    assert compat.kv_sharing_modes(transformers.LlamaConfig()) == []  # no sharing


def test_gemma4_store_and_query_cut_are_the_installed_releases():
    """The store of shared keys and values is the class the installed Gemma 4 passes its layers, and
    the text model cuts the shared layers' queries to ``logits_to_keep`` exactly where ``compat``
    says it does."""
    from transformers.models.gemma4 import modeling_gemma4

    source = inspect.getsource(modeling_gemma4.Gemma4TextModel.forward)
    assert type(compat.shared_kv_store()).__name__ in source
    assert compat.GEMMA4_CUTS_SHARED_QUERIES == ("_maybe_slice_kv_shared_inputs" in source)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_runs_or_is_refused_by_name_on_the_installed_release(name):
    """On the installed release a family either runs a reduced forward or is refused at attach with
    the release it needs (``compat.FAMILY_NEEDS``): nothing is half-run."""
    family = FAMILIES[name]
    model = family.model()
    needed = release_needed(model)
    reducer = duet_vlm.make("fastv", ratio=0.5)
    if needed is not None:
        hooks = hook_ids(model)
        with pytest.raises(TypeError, match=f"transformers {re.escape(needed)} or newer"):
            reducer.attach(model)
        assert hook_ids(model) == hooks
        return
    with torch.no_grad(), reducer(model):
        model(**family.one(model))
    assert reducer.stats.tokens_per_layer


def _release_features() -> dict[str, tuple[object, object]]:
    """Each release boundary ``compat`` names: (what ``compat`` says of the installed release, what
    the installed release's own code shows)."""
    from transformers import PreTrainedModel, Qwen3_5ForConditionalGeneration, VideoLlavaModel
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.models.gemma4 import modeling_gemma4

    video_llava = inspect.signature(VideoLlavaModel.forward).parameters
    gemma4 = inspect.getsource(modeling_gemma4.Gemma4TextModel.forward)
    encodes_before = compat.INSTALLED >= Version(compat.ENCODES_BEFORE_PREFILL["qwen3_5"])
    return {
        # 5.21: Video-LLaVA's base model takes its images as pixel_values
        "VIDEO_LLAVA_IMAGES": (compat.VIDEO_LLAVA_IMAGES, "pixel_values" if "pixel_values" in video_llava else "pixel_values_images"),
        # 5.20.2: Qwen3.5 declares its input modalities, so generate encodes its images before the prefill
        "ENCODES_BEFORE_PREFILL": (encodes_before, "image" in Qwen3_5ForConditionalGeneration.input_modalities),
        # 5.23: activation checkpointing by that name; a layer checkpoints its forward, not its __call__
        "CHECKPOINTING": (compat.CHECKPOINTING == "activation_checkpointing",
                          hasattr(PreTrainedModel, "activation_checkpointing_enable")),
        "HOOKS_OUTSIDE_CHECKPOINT": (compat.HOOKS_OUTSIDE_CHECKPOINT, "__call__" not in GradientCheckpointingLayer.__dict__),
        # 5.23: Gemma 4's store of shared keys and values, and its cut of the shared layers' queries
        "KVSharingDict": (compat.KVSharingDict is not None, type(compat.shared_kv_store()).__name__ == "KVSharingDict"
                          and "KVSharingDict" in gemma4),
        "GEMMA4_CUTS_SHARED_QUERIES": (compat.GEMMA4_CUTS_SHARED_QUERIES, "_maybe_slice_kv_shared_inputs" in gemma4),
        # 5.24: the cache keyword (the cache_keyword test checks each family's forwards)
        "CACHE": (compat.CACHE, "cache" if "cache" in inspect.signature(masking_utils.create_causal_mask).parameters
                  else "past_key_values"),
    }


@pytest.mark.parametrize("boundary", sorted(_release_features()))
def test_each_release_boundary_is_where_the_installed_release_has_it(boundary):
    """What ``compat`` says of the installed release at each boundary it names equals what that
    release's code does. CI runs this file on the releases either side of every boundary
    (``tools/check_release_boundaries.sh``: 5.20.1 | 5.20.2, 5.20.2 | 5.21.0, 5.22.2 | 5.23.0,
    5.23.0 | 5.24.0, besides the oldest and newest lanes), so a boundary put one release off fails."""
    said, found = _release_features()[boundary]
    assert said == found, f"compat says {said!r} of transformers {transformers.__version__}, which has {found!r}"


def test_the_reencoded_prefill_check_asks_nothing_of_the_prompt_where_the_release_needs_no_check():
    """``check_reencoded`` reads whether the prompt continues (a host sync per row) only on a release
    that encodes the images again at every step; on others it never asks."""
    asked = []

    def continues():
        asked.append(True)
        return True

    needs = compat.INSTALLED < Version(compat.ENCODES_BEFORE_PREFILL["qwen3_5"])
    if needs:
        with pytest.raises(NotImplementedError, match="needs transformers 5.20.2 or newer for qwen3_5"):
            compat.check_reencoded("qwen3_5", continues)
    else:
        compat.check_reencoded("qwen3_5", continues)
    compat.check_reencoded("llava", continues)  # a family without the difference: never asked
    assert asked == ([True] if needs else [])
