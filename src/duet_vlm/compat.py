"""What differs between the transformers releases duet-vlm supports, said once.

duet-vlm's hooks read transformers' call signatures, cache classes and mask helpers. Where two
supported releases differ, the runtime, the adapters and the check ask this module instead of testing
versions themselves; each difference names the release that introduced it. The supported range is
``pyproject.toml``'s (``SUPPORTED``); CI runs the default suite on its newest and its oldest
release, and ``tests/test_compat.py`` on the releases either side of every boundary named here
(``.ci/run``, ``tools/check_release_boundaries.sh``).
"""

from __future__ import annotations

from collections import UserDict
from typing import Callable

import transformers
from packaging.version import Version
from transformers import cache_utils

#: The transformers releases duet-vlm is tested on: ``pyproject.toml``'s range.
SUPPORTED = ">=5.19,<5.25"
INSTALLED = Version(transformers.__version__)

# transformers 5.24 renamed the cache argument of every decoder forward (the language model's, each
# decoder layer's and attention's) and of the mask helpers (``create_causal_mask`` and its siblings)
# from ``past_key_values`` to ``cache``; outputs hold it as ``cache`` (``.past_key_values`` stays
# readable) and the old keyword is still accepted, with a deprecation warning, until 5.40.
CACHE = "cache" if INSTALLED >= Version("5.24.0.dev0") else "past_key_values"
_OLD_CACHE = "past_key_values"


def cache_of(kwargs: dict):
    """The cache a forward's keyword arguments carry (``None``: none), under either name: the
    installed release's, or the old one a caller may still pass."""
    cache = kwargs.get(CACHE)
    return kwargs.get(_OLD_CACHE) if cache is None and CACHE != _OLD_CACHE else cache


def with_cache(cache) -> dict:
    """The keyword argument that passes ``cache`` to a decoder forward or a mask helper."""
    return {CACHE: cache}


# transformers 5.21 renamed Video-LLaVA's image argument ``pixel_values_images`` to ``pixel_values``
# (the top model still takes the old name and renames it before the base model, where the runtime
# hooks); 5.19 and 5.20 hand the base model ``pixel_values_images``. No other family uses that name,
# so the runtime reads both on every release (``images_of``); inputs built by hand name the installed
# release's (``VIDEO_LLAVA_IMAGES``).
IMAGE_ARGUMENTS = ("pixel_values", "pixel_values_images")
VIDEO_LLAVA_IMAGES = "pixel_values" if INSTALLED >= Version("5.21.0.dev0") else "pixel_values_images"


def images_of(kwargs: dict):
    """The images a forward's keyword arguments carry to encode (``None``: none), under either name."""
    return next((kwargs[name] for name in IMAGE_ARGUMENTS if kwargs.get(name) is not None), None)


# transformers 5.20.2 (a patch release; 5.21 too) declares Qwen3.5's and Qwen3.5-MoE's input modalities,
# so that generate encodes their images before the prefill (``mm_encoder_outputs``); on 5.19.0 to
# 5.20.1 generate hands the prefill the raw pixels, and the runtime captures the tower's features in
# that forward instead (the path of a plain forward). Both paths are the runtime's, with one
# difference it does not hide: generate *without a cache* then encodes the images again at every
# step, so the step's prefill is a new encoding and does not keep the first step's selection; a
# method that prunes inside the language model selects again from the prompt as it has grown, and
# such a generate no longer equals the cached one (measured on 5.19.0, the tiny Qwen3.5 under FastV:
# the same tokens, scores up to 0.069 apart; exact on 5.20.2, 5.21.0 and 5.22.0;
# tests/test_qwen3_5.py::test_cached_decoding_equals_uncached fails there, outside CI's oldest
# lane). Cached generate (generate's default) keeps its one selection on every release; a prefill
# without a cache that continues the last one's prompt with its images encoded again is refused
# there, naming the release (``check_reencoded``).
# (Measured on 5.19.0: the tiny Qwen3.5's greedy and beam-search generate, unpatched and under
# VisionZip; tests/test_families.py's Qwen3.5 cases pass there.)

#: Per family, the release from which ``generate`` encodes its images before the prefill (so that
#: generate without a cache prefills every step from one encoding), where it is newer than the floor.
ENCODES_BEFORE_PREFILL = {"qwen3_5": "5.20.2"}


def check_reencoded(family: str, continues: Callable[[], bool]) -> None:
    """Refuse a prefill without a cache whose images were encoded again, where it ``continues()`` the
    last one's prompt, on a release whose ``generate`` does that at every step for ``family``: its
    selection would be made again from the grown prompt (see above). ``continues`` is asked only on
    such a release."""
    release = ENCODES_BEFORE_PREFILL.get(family)
    if release is not None and INSTALLED < Version(release) and continues():
        raise NotImplementedError(
            f"generate without a cache under a method that prunes inside the language model (or reads the prompt) "
            f"needs transformers {release} or newer for {family}: transformers {transformers.__version__} encodes "
            f"the images again at every step, so the selection would change as the answer grows. Generate with the "
            f"cache (the default), or {_install(release)}"
        )


# transformers 5.21 gave Qwen3.5's linear-attention layers cache accessors of their own
# (``Cache.get_conv_state``, ``get_recurrent_state``; 5.19 and 5.20 read ``layers[i].conv_states``);
# duet-vlm reads neither: its check reads ``layers[i].recurrent_states``, present from 5.16 to 5.24.
#
# What transformers 5.24 deprecates for later releases is not read by duet-vlm, so the next releases
# need no edit here for it: ``image_hidden_states`` (another meaning from 5.30), ``Cache.update``'s
# ``cache_kwargs`` (now ``kwargs=``), ``modeling_attn_mask_utils`` (removed), Qwen3.5's
# ``cache_params`` (now ``cache``, which ``CACHE`` above names).


# transformers 5.23 renamed gradient checkpointing to activation checkpointing: the models'
# ``activation_checkpointing_enable`` and ``TrainingArguments``' ``activation_checkpointing`` and
# ``activation_checkpointing_kwargs`` (it keeps the old names too); 5.22 has only the
# ``gradient_checkpointing`` ones.
CHECKPOINTING = "activation_checkpointing" if INSTALLED >= Version("5.23.0.dev0") else "gradient_checkpointing"


def enable_checkpointing(model, **kwargs) -> None:
    """``model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)``, by the
    installed release's name."""
    getattr(model, f"{CHECKPOINTING}_enable")(**({f"{CHECKPOINTING}_kwargs": kwargs} if kwargs else {}))


def checkpointing_enabled(model) -> bool:
    """``model.is_activation_checkpointing``, by the installed release's name."""
    return bool(getattr(model, f"is_{CHECKPOINTING}"))


def disable_checkpointing(model) -> None:
    """``model.activation_checkpointing_disable()``, by the installed release's name."""
    getattr(model, f"{CHECKPOINTING}_disable")()


def checkpointing_arguments(enabled: bool, kwargs: dict | None) -> dict:
    """``TrainingArguments``' checkpointing switch and its keyword arguments, by the installed release's names."""
    return {CHECKPOINTING: enabled, f"{CHECKPOINTING}_kwargs": kwargs}

# transformers 5.23 checkpoints a decoder layer's ``forward`` (``GradientCheckpointingLayer``), so
# module hooks run once per step; 5.22 checkpoints ``__call__``, so the backward pass's recompute runs
# the runtime's layer hooks again, which its per-call state cannot follow.
HOOKS_OUTSIDE_CHECKPOINT = INSTALLED >= Version("5.23.0.dev0")


def check_checkpointing(layers) -> None:
    """Refuse a reducing training forward through checkpointed decoder ``layers`` on a release that
    re-runs module hooks in the recompute, naming the release that does not."""
    if not HOOKS_OUTSIDE_CHECKPOINT and any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise NotImplementedError(
            f"gradient (activation) checkpointing under a duet-vlm reducer needs transformers 5.23 or newer: "
            f"transformers {transformers.__version__} checkpoints each layer's __call__, so the backward pass "
            f"re-runs the reducer's hooks. {_install('5.23')}, or train without checkpointing"
        )


# A static cache under a reduction (``runtime.static``) is exact against the dynamic cache on
# transformers 5.24 (every family, one row and a padded batch); on 5.19 a padded batch of several
# families decodes other tokens (not traced to its cause), so older releases are refused by name.
STATIC_UNDER_REDUCTION = INSTALLED >= Version("5.24.0.dev0")


def check_static_cache() -> None:
    """Refuse a static cache under a reduction on a release it is not exact on, naming the one it is."""
    if not STATIC_UNDER_REDUCTION:
        raise NotImplementedError(
            f"a static cache under a duet-vlm reduction needs transformers 5.24 or newer: on transformers "
            f"{transformers.__version__} a padded batch decodes other tokens than on the dynamic cache. "
            f"{_install('5.24')}, or use the default dynamic cache"
        )


def _install(release: str) -> str:
    """The pip line that installs ``release`` or newer within ``SUPPORTED``."""
    return f"pip install 'transformers>={release},<{SUPPORTED.split('<')[1]}'"


# transformers 5.23 changed three things in Gemma 4's key/value sharing (the last
# ``num_kv_shared_layers`` decoder layers reuse the keys and values of the last earlier layer of their
# type, which stores them), all read here:
# - the store the layers pass them in: ``cache_utils.KVSharingDict``; 5.19 to 5.22 pass a
#   ``collections.UserDict`` (``shared_kv_store``);
# - each layer's part, "store", "reuse" or neither: the text config's ``kv_sharing_modes``; 5.19 to 5.22
#   compute it in each attention layer from ``num_kv_shared_layers`` and ``layer_types`` by the same rule
#   (``kv_sharing_modes``);
# - from the first reusing layer on, the text model passes its layers only the rows ``logits_to_keep``
#   asks for (``Gemma4TextModel._maybe_slice_kv_shared_inputs``); 5.19 to 5.22 pass every row
#   (``GEMMA4_CUTS_SHARED_QUERIES``).
KVSharingDict = getattr(cache_utils, "KVSharingDict", None)
GEMMA4_CUTS_SHARED_QUERIES = INSTALLED >= Version("5.23.0.dev0")


def shared_kv_store():
    """An empty store of shared keys and values for Gemma 4's layers, of the installed release's class."""
    return KVSharingDict() if KVSharingDict is not None else UserDict()


def kv_sharing_modes(text_config) -> list[str | None]:
    """Per decoder layer of a language model that shares keys and values, ``"store"``, ``"reuse"`` or
    ``None`` (the text config's ``kv_sharing_modes`` from transformers 5.23, each attention layer's
    rule before); ``[]`` for a config without sharing (no ``num_kv_shared_layers``).

    >>> from transformers import Gemma4TextConfig
    >>> kv_sharing_modes(Gemma4TextConfig(num_hidden_layers=4, num_kv_shared_layers=2,
    ...                  layer_types=["sliding_attention", "full_attention"] * 2))
    ['store', 'store', 'reuse', 'reuse']
    """
    if isinstance(getattr(type(text_config), "kv_sharing_modes", None), property):
        return list(text_config.kv_sharing_modes)
    return layer_rule_kv_sharing_modes(text_config)


def layer_rule_kv_sharing_modes(text_config) -> list[str | None]:
    """``kv_sharing_modes`` by the rule 5.19 to 5.22 apply in each attention layer: a layer from
    ``num_hidden_layers - num_kv_shared_layers`` on reuses (``is_kv_shared_layer``); before it, the
    last layer of each type stores (``store_full_length_kv``)."""
    shared = getattr(text_config, "num_kv_shared_layers", None)
    if shared is None:
        return []
    layers = text_config.num_hidden_layers
    first = layers - shared
    modes: list[str | None] = [None if i < first else "reuse" for i in range(layers)]
    earlier = list(text_config.layer_types)[:first]
    for kind in set(earlier):
        modes[first - 1 - earlier[::-1].index(kind)] = "store"
    return modes


#: Per family, the oldest release its adapter runs on, where it is newer than ``SUPPORTED``'s floor,
#: and why.
#: None today: every family runs on every supported release.
FAMILY_NEEDS: dict[str, tuple[str, str]] = {}


def release_needed(family: str) -> str | None:
    """The release ``family`` needs where the installed one is older (``FAMILY_NEEDS``), else ``None``."""
    needs = FAMILY_NEEDS.get(family)
    return needs[0] if needs is not None and INSTALLED < Version(needs[0]) else None


def check_family(family: str, model_class: str) -> None:
    """Refuse, at attach, a family the installed transformers handles differently from the release
    its adapter reads, naming the release it needs."""
    needed = release_needed(family)
    if needed is not None:
        raise TypeError(
            f"duet-vlm reduces {model_class} with transformers {needed} or newer ({FAMILY_NEEDS[family][1]}); "
            f"transformers {transformers.__version__} is installed: {_install(needed)}"
        )
