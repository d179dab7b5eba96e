"""What the processor of every family shares under vLLM, written once, a family saying only what
differs (as PEFT's ``BaseTuner.inject_adapter`` owns the walk and a tuner writes only
``_create_and_replace``).

``DuetProcessorMixin`` (before vLLM's processor class in the bases): reads the server's and the
request's options, keeps them from the Hugging Face processor, and gives every item of a modality
a method reduces (images; a family's videos) fields that travel with its pixels to the model
(``write_item_fields``: its absolute budget, 0 for unreduced; its method where the server lets
requests choose; its prompt's text where the method reads it), read back as ``ItemFields``. Its
``_get_prompt_updates`` cuts each item's placeholders to its method's count; a family says where an
item's geometry comes from (``geometry_fields``, ``item_geometry``, the Hugging Face adapter's
geometry function) and, where vLLM writes more than the placeholders, its replacement
(``placeholders``). The model's side is ``common``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Mapping

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ProcessorBatchItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from ...geometry import Geometry
from .options import Settings, field_prefix, language_plan_for, strip, tokens_for


#: where the processor says what a request asked that it cannot do (an image its budget leaves unreduced).
LOG = logging.getLogger("duet_vlm.vllm")

#: the modalities a method can reduce, each with the processor's key of its pixels, which is also the
#: ``type`` of vLLM's parsed input of them (another type: embeddings given, served as vLLM serves them).
PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


def server_options(model_config) -> dict:
    """The server-wide processor options (``--mm-processor-kwargs``)."""
    mm_config = getattr(model_config, "multimodal_config", None)
    return dict(getattr(mm_config, "mm_processor_kwargs", None) or {})


class WithoutDuetOptions:
    """A Hugging Face processor called without duet-vlm's options (the rest passes through).

    One call is adjusted. vLLM 0.32's Qwen3-VL and Gemma 4 processors process each video on its own,
    then call transformers' processor with text holding the videos' placeholders (written out) and
    no videos, which transformers 5.23 and later refuse ("Found 1 <|video_pad|> tokens in the text
    but no videos were passed"; on 5.19 to 5.22, which the engines install, the copy changes
    nothing). That call is made on a copy of the processor without its video token, so the
    placeholders are tokenized as text, as before 5.23; every other call is the processor's own."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, *args, **kwargs):
        processor = self.processor
        token = getattr(processor, "video_token", None)
        text = kwargs.get("text")
        texts = [text] if isinstance(text, str) else list(text or [])
        if kwargs.get("videos") is None and token is not None and any(token in t for t in texts):
            processor = copy.copy(processor)
            processor.video_token = None
        return processor(*args, **strip(kwargs))

    def __getattr__(self, name: str):
        if name == "processor":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.processor, name)


class DuetInfoMixin:
    """Before a family's vLLM processing info: its Hugging Face processor is never called with duet-vlm's
    options, even where vLLM's processor calls it directly with the request's (InternVL's images,
    LLaVA-OneVision's videos). The server's options still reach the processor's construction (vLLM's
    ``ctx.get_hf_processor`` merges them in), where transformers warns once that it ignores them."""

    #: the wrapper the Hugging Face processor is called through.
    wrapper = WithoutDuetOptions

    def get_hf_processor(self, **kwargs: object):
        return self.wrapper(super().get_hf_processor(**strip(kwargs)))


class DuetProcessorMixin:
    """Reads duet-vlm's options and cuts each reduced item's placeholders to its method's count; a
    family gives each item's ``Geometry`` (``item_geometry``) and, where vLLM writes more than the
    placeholders, their replacement (``placeholders``)."""

    #: each modality the family reduces, with the processed field (one row per item) its items'
    #: geometry is read from (``item_geometry``).
    geometry_fields: dict[str, str] = {"image": "pixel_values"}

    def settings(self, request: Mapping[str, object] | None = None) -> Settings:
        if getattr(self, "_duet_profiling", False):
            return Settings()
        request = {k: v for k, v in (request or {}).items() if k != "duet_text"}
        # the processor sizes placeholders only (a plan's vision side); whether a method that drops
        # inside the language model is served is the model's to say, at start
        return Settings.read(server_options(self.info.ctx.model_config), request, language=True)

    def item_geometry(self, modality: str, sizes) -> Geometry:
        """The geometry of an item of ``modality`` from its row of ``geometry_fields[modality]``."""
        raise NotImplementedError

    def item_geometries(self, processed, hf_kwargs, modality: str = "image") -> list[Geometry]:
        """The geometry of each item of ``modality`` the processor produced."""
        return [self.item_geometry(modality, sizes) for sizes in processed[self.geometry_fields[modality]]]

    def placeholders(self, update: PromptReplacement, item_idx: int, item, count: int):
        """The replacement of item ``item_idx`` (``item``: its processed fields) with ``count``
        placeholders: the update's target (the placeholder) ``count`` times, where vLLM writes nothing
        around them."""
        (token,) = update.target
        return [token] * count

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        """vLLM's prompt updates, with each item of a reduced modality as many placeholders as its
        method keeps at its budget (items given as embeddings as vLLM writes them)."""
        updates = super()._get_prompt_updates(mm_items, strip(hf_processor_mm_kwargs), out_mm_kwargs)
        if not self.settings().active:
            return updates
        return [self._reduced_update(update, mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
                if update.modality in self.geometry_fields else update for update in updates]

    def _reduced_update(self, update, mm_items, hf_kwargs, out_mm_kwargs) -> PromptReplacement:
        modality, field = update.modality, self.geometry_fields[update.modality]

        def replacement(item_idx: int):
            if not isinstance(mm_items.get(modality), ProcessorBatchItems):  # embeddings given: not reduced
                return update.replacement(item_idx)
            item = out_mm_kwargs[modality][item_idx]
            count = self.reduced_tokens(hf_kwargs, self.item_geometry(modality, item[field].data))
            return self.placeholders(update, item_idx, item, count)

        return PromptReplacement(modality=modality, target=update.target, replacement=replacement)

    def placeholder_ids(self) -> set[int]:
        """The token ids of visual placeholders (not text)."""
        config = self.info.get_hf_config()
        return {getattr(config, "image_token_index", None), getattr(config, "image_token_id", None),
                getattr(config, "video_token_id", None)} - {None}

    def get_dummy_mm_inputs(self, *args, **kwargs):
        """vLLM sizes its encoder cache and profiles memory with the largest item: unreduced, since a
        request may ask for any budget up to its item's tokens."""
        self._duet_profiling = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            self._duet_profiling = False

    def apply(self, inputs, timing_ctx):
        """A method that reads the prompt's text gets it with every image (``duet_text``: the prompt's
        non-placeholder token ids); it is part of the options, so vLLM's caches key items by it too."""
        request = dict(inputs.hf_processor_mm_kwargs or {})
        request.pop("duet_text", None)
        if not getattr(self, "_duet_profiling", False):
            Settings.check_request(server_options(self.info.ctx.model_config), request)
        settings = self.settings(request)
        if settings.active and settings.needs_text() and isinstance(inputs.prompt, (list, tuple)):
            text = self.prompt_text([int(t) for t in inputs.prompt])
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**request, "duet_text": text})
        return super().apply(inputs, timing_ctx)

    def prompt_text(self, prompt: list[int]) -> tuple[int, ...]:
        """The text of a prompt as the Hugging Face path reads it: its ids without the visual placeholders."""
        placeholders = self.placeholder_ids()
        return tuple(t for t in prompt if t not in placeholders)

    def text_with_markers(self, prompt: list[int], token: int, markers: list[int]) -> tuple[int, ...]:
        """The prompt's text with ``markers`` where each ``token`` (an image's one placeholder in the
        prompt) stands, the other placeholders dropped: vLLM writes the markers around the image's
        run (InternVL's ``<img>`` ``</img>``, Gemma 4's ``<start_of_image>`` ``<end_of_image>``), and
        the Hugging Face path reads them as text."""
        placeholders = self.placeholder_ids()
        text = []
        for t in prompt:
            if t == token:
                text += markers
            elif t not in placeholders:
                text.append(t)
        return tuple(text)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        # vLLM merges the server's options in again inside ``call_hf_processor``: the processor is
        # called through a wrapper that takes duet-vlm's keys out.
        ctx = self.info.ctx
        processor = self.info.get_hf_processor(**strip(hf_kwargs))
        return ctx.call_hf_processor(WithoutDuetOptions(processor), hf_data, strip(hf_kwargs))

    #: where the family's videos are served unreduced: its name for the log line (``None``: they are
    #: reduced, or the family has none).
    unreduced_videos: str | None = None

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        settings = self.settings(hf_processor_mm_kwargs)
        if settings.active and self.unreduced_videos and processed_data.get("pixel_values_videos") is not None:
            LOG.warning("duet-vlm: videos are served unreduced on %s", self.unreduced_videos)
        for modality in self.geometry_fields:
            if settings.active and processed_data.get(PIXELS[modality]) is not None:
                geometries = self.item_geometries(processed_data, hf_processor_mm_kwargs, modality)
                write_item_fields(processed_data, settings, geometries, hf_processor_mm_kwargs.get("duet_text"), modality)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for modality in self.geometry_fields:
            fields.update(item_fields_config(hf_inputs, modality))
        return fields

    def reduced_tokens(self, hf_processor_mm_kwargs, geometry: Geometry) -> int:
        """An image's placeholder count: the method's token count at the image's budget."""
        settings = self.settings(hf_processor_mm_kwargs)
        return tokens_for(settings, settings.item_budget(geometry), geometry)


def cut_runs(full: PromptUpdateDetails, token: int, count: int) -> PromptUpdateDetails:
    """vLLM's own replacement of an item (``full``, unreduced) with each run of ``token`` cut to its
    first ``count``, the embeddings going to ``token``: an item's reduced placeholders, its other ids
    as vLLM writes them (``<start_of_image>``, newlines, ...); ``full`` itself where nothing is cut."""
    kept, run = [], 0
    for t in full.full:
        run = run + 1 if t == token else 0
        if t != token or run <= count:
            kept.append(t)
    return full if len(kept) == len(full.full) else PromptUpdateDetails.select_token_id(kept, token)


@dataclasses.dataclass
class ItemFields:
    """What the processor gave each item of one modality in a batch: its absolute budget (0:
    unreduced), its prompt's text ids (methods that read the text), and its method (an index into
    the server's ``Settings.methods``; ``None`` where the server allows no other)."""

    budgets: list[int] | None = None
    texts: object = None
    methods: list[int] | None = None

    @classmethod
    def take(cls, kwargs: dict, modality: str = "image") -> "ItemFields":
        """The fields of ``modality``'s items, taken out of a batch's arguments."""
        prefix = field_prefix(modality)
        budgets, texts, methods = (kwargs.pop(prefix + key, None) for key in ("budget", "text", "method"))
        kwargs.pop(prefix + "layer_tokens", None)  # the scheduler's (``memory``), not the model's
        return cls(_ints(budgets), texts, _ints(methods))

    def settings(self, server: Settings, index: int) -> Settings:
        """The settings of item ``index``: the server's, or the method its request chose."""
        return server if not self.methods else server.choose(self.methods[index])


def _ints(values) -> list[int] | None:
    return None if values is None else [int(v) for v in torch.as_tensor(values).reshape(-1).tolist()]


def item_fields_config(hf_inputs, modality: str = "image") -> dict:
    """vLLM's field config of the item fields the processor wrote for ``modality``."""
    prefix = field_prefix(modality)
    return {prefix + key: MultiModalFieldConfig.batched(modality)
            for key in ("budget", "text", "method", "layer_tokens") if prefix + key in hf_inputs}


def write_item_fields(processed_data: dict, settings: Settings, geometries: list, text, modality: str = "image") -> None:
    """Give each of ``modality``'s items (``geometries``) its budget, method and prompt text, and
    log the items a budget leaves unreduced."""
    prefix = field_prefix(modality)
    budgets = [settings.item_budget(g) for g in geometries]
    for geometry, budget in zip(geometries, budgets):
        if budget == 0:
            LOG.warning(
                "duet-vlm: %s of %d visual tokens is served unreduced: %s is not below its tokens",
                f"an {modality}" if modality == "image" else f"a {modality}", geometry.visual_tokens,
                f"duet_budget {settings.budget}" if settings.budget is not None else f"duet_ratio {settings.ratio}",
            )
    processed_data[prefix + "budget"] = torch.tensor(budgets, dtype=torch.long)
    plans = [language_plan_for(settings, budget, geometry) for budget, geometry in zip(budgets, geometries)]
    if any(plan is not None for plan in plans):  # what each decoder layer holds of each item (``memory``)
        processed_data[prefix + "layer_tokens"] = torch.tensor(
            [plan.schedule.tokens_per_layer if plan is not None else [tokens_for(settings, budget, geometry)] * geometry.num_layers
             for plan, budget, geometry in zip(plans, budgets, geometries)], dtype=torch.long)
    if settings.allow:  # the item's method, as its index in the server's methods
        processed_data[prefix + "method"] = torch.tensor([settings.methods.index(settings.method)] * len(geometries), dtype=torch.long)
    if text is not None:
        processed_data[prefix + "text"] = torch.tensor([list(text)] * len(geometries), dtype=torch.long)


def consecutive(counts) -> list[slice]:
    """The rows of each item of a batch whose items take ``counts`` rows each, in order.

    >>> consecutive([2, 1, 3])
    [slice(0, 2, None), slice(2, 3, None), slice(3, 6, None)]
    """
    ends = list(itertools.accumulate(counts))
    return [slice(end - count, end) for count, end in zip(counts, ends)]
