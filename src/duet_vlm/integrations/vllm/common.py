"""What the processor and the model of every family share under vLLM: the two skeletons, each written
once, a family saying only what differs (as PEFT's ``BaseTuner.inject_adapter`` owns the walk and a
tuner writes only ``_create_and_replace``).

``DuetProcessorMixin`` (before vLLM's processor class in the bases): reads the server's and the
request's options, keeps them from the Hugging Face processor, and gives every item of a modality
a method reduces (images; a family's videos) fields that travel with its pixels to the model
(``write_item_fields``: its absolute budget, 0 for unreduced; its method where the server lets
requests choose; its prompt's text where the method reads it), read back as ``ItemFields``. Its
``_get_prompt_updates`` cuts each item's placeholders to its method's count; a family says where an
item's geometry comes from (``geometry_fields``, ``item_geometry``, the Hugging Face adapter's
geometry function) and, where vLLM writes more than the placeholders, its replacement
(``placeholders``).

``DuetTowerMixin`` (before vLLM's model class): the server's reducer and the loop over a batch's
items (``reduce_items``: each item's plan, then vLLM's embedding or the method's stage); a family
says how it encodes a batch (``encode``) and what an item is unreduced (``unreduced``) and reduced
(``units``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Mapping
from typing import Callable

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ProcessorBatchItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from ...geometry import Geometry
from ...plan import Plan
from .options import RefusedMethod, Settings, field_prefix, language_plan_for, plan_for, strip, tokens_for
from .select import Taps, encoder_index, layer_scores, reduce_unit, tap


#: where the processor says what a request asked that it cannot do (an image its budget leaves unreduced).
LOG = logging.getLogger("duet_vlm.vllm")

#: the modalities a method can reduce, each with the processor's key of its pixels, which is also the
#: ``type`` of vLLM's parsed input of them (another type: embeddings given, served as vLLM serves them).
PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


def server_options(model_config) -> dict:
    """The server-wide processor options (``--mm-processor-kwargs``)."""
    mm_config = getattr(model_config, "multimodal_config", None)
    return dict(getattr(mm_config, "mm_processor_kwargs", None) or {})


#: why Gemma 3 and Gemma 4 do not drop inside the language model under vLLM (their
#: ``language_refusal``).
SLIDING_WINDOW_REFUSAL = (
    "its sliding-window layers count a window in positions of vLLM's cache, which would hold the kept tokens "
    "only, where transformers counts it in the prompt's positions (the two agree only on prompts shorter than "
    "the window), and its image blocks' bidirectional ranges would have to move with the kept tokens"
)


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


def identity(features: torch.Tensor) -> torch.Tensor:
    return features


@dataclasses.dataclass
class Encoded:
    """One item of a batch as its family encoded it (``DuetTowerMixin.encode``): its geometry, its
    plan (``None``: embedded as vLLM embeds it), its rows of the tower's batch, the tower's taps, and
    what else the family reads it by (``data``)."""

    geometry: Geometry
    plan: Plan | None
    rows: slice | None = None
    taps: Taps | None = None
    data: object = None


class DuetModelMixin:
    """What every family's vLLM model shares: the server's settings (``read_settings``), each batch's
    item fields, taken out of vLLM's arguments before its ``embed_multimodal`` runs and read by the
    family's embedding of each modality, and, on a family that serves them, what duet-vlm's runner
    asks about methods that drop inside the language model (``duet_language_plans``)."""

    def embed_multimodal(self, **kwargs: object):
        self._duet_items = {modality: ItemFields.take(kwargs, modality) for modality in PIXELS}
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._duet_items = {}

    def reduced_fields(self, parsed, modality: str = "image") -> ItemFields | None:
        """The fields of a batch of ``modality`` (vLLM's parsed input) a method reduces; ``None``
        where vLLM embeds it (no method, no budgets, embeddings given)."""
        fields = getattr(self, "_duet_items", {}).get(modality)
        if not self.duet.active or fields is None or fields.budgets is None or parsed["type"] != PIXELS[modality]:
            return None
        return fields

    def item_plans(self, fields: ItemFields, geometries: list[Geometry]) -> list[Plan | None]:
        """Each item's plan at its budget by its own method (``None``: unreduced)."""
        return [plan_for(fields.settings(self.duet, index), budget, geometry)
                for index, (budget, geometry) in enumerate(zip(fields.budgets, geometries))]

    #: whether the family serves methods that drop inside the language model (``language``), given
    #: duet-vlm's worker; a family says where its items' geometry and its decoder layers are
    #: (``language_geometry``, ``text_model``).
    serves_language = False
    #: where it does not: why, said to a server started with duet-vlm's worker (``family`` names it).
    language_refusal = "its language model is not one the plugin drops in yet"

    def read_settings(self, vllm_config) -> Settings:
        """The server's options (``self.duet``). With duet-vlm's worker, on a family that serves
        them, methods that drop inside the language model are served (``setup_language``); elsewhere
        they are refused (with the worker given, naming the family and why it is not served)."""
        from .language import WORKERS

        worker = getattr(vllm_config.parallel_config, "worker_cls", None) in WORKERS
        served = self.serves_language and worker
        not_served = None
        if worker and not self.serves_language:
            family = getattr(self, "family", None) or type(self).__name__.removeprefix("Duet").removesuffix("ForConditionalGeneration")
            not_served = f"{family} is not served with dropping inside the language model: {self.language_refusal}"
        self._duet_model_config = vllm_config.model_config
        self.duet = Settings.read(server_options(vllm_config.model_config), language=served, not_served=not_served)
        if self.duet.active and served:
            self.setup_language(vllm_config)
        return self.duet

    def setup_language(self, vllm_config) -> None:
        """With duet-vlm's worker: where a method the server runs (its own, or one a request may
        choose) drops inside the language model, the engine's settings and the method's stage are
        checked, and the hooks that drop are installed on the decoder layers (``LanguageStages``)."""
        from .language import LanguageStages, check_engine, check_stage

        geometry = self.language_geometry()
        drops, boundaries = False, set()
        for index in range(len(self.duet.methods)):
            # whether a method drops inside the language model, and by which stage, is not a matter of
            # the budget: half a typical item's tokens (the server's budget may not fit this item)
            settings = self.duet.choose(index)
            plan = language_plan_for(settings, geometry.visual_tokens // 2, geometry)
            if plan is not None:
                check_stage(plan, settings.method)
                drops = True
                boundaries.update(layer for layer, _ in plan.schedule.boundaries)
        if drops:
            check_engine(vllm_config)
            self._duet_language = LanguageStages(self, self.text_model())
            self._duet_boundaries = sorted(boundaries)

    @property
    def get_model_state_cls(self):
        """vLLM's Model Runner V2 asks the model for the class of its per-step state where the model
        has this member (``resolve_model_state_cls``): present only on a server that drops inside the
        language model, whose state builds the compacted layers' metadata (``language.DuetModelState``,
        vLLM's ``DefaultModelState`` otherwise); elsewhere vLLM chooses as it would."""
        if getattr(self, "_duet_language", None) is None:
            raise AttributeError("get_model_state_cls")
        from . import language

        config = getattr(self, "_duet_model_config", None)
        if config is not None and (config.is_hybrid or config.is_attention_free):
            raise language.StageNotServed(f"{type(self).__name__}: duet-vlm's Model Runner V2 state is vLLM's DefaultModelState; "
                                          "a hybrid or attention-free model needs its own")
        return lambda: language.DuetModelState

    def duet_boundaries(self) -> list[int]:
        """The decoder layers before which a method the server runs drops (at a typical item):
        where the KV-cache groups that hold the kept tokens only begin (``memory``)."""
        return getattr(self, "_duet_boundaries", [])

    def runs_are_items(self, modality: str) -> bool:
        """Whether each run of a ``modality`` item's embeddings in the prompt is an item of its own,
        with the item's budget (a Qwen3-VL video's temporal slices); elsewhere an item is one run."""
        return False

    def language_geometry(self, feature=None) -> Geometry:
        """The geometry of an item (vLLM's ``MultiModalFeatureSpec``) for the plans of methods that
        drop inside the language model (the family's); ``None``: a typical image's, to check at start
        what the server's methods do."""
        raise NotImplementedError

    def text_model(self):
        """vLLM's decoder (the module holding ``layers``) of the language model."""
        return self.language_model.model

    def duet_num_layers(self) -> int:
        return len(self.text_model().layers)

    def duet_attention_layer_names(self) -> list[str]:
        """Each decoder layer's attention, as vLLM's per-layer metadata names it."""
        return [layer.self_attn.attn.layer_name for layer in self.text_model().layers]

    def duet_language_plans(self, features) -> list[tuple[int, int, Plan | None]]:
        """Each item's ``(offset, length, plan)`` where its method drops inside the language model
        (``features``: ``(offset, length, vLLM's MultiModalFeatureSpec)``, a feature once per run
        where its runs are items), for the runner."""
        if not self.duet.active or not self.duet.language:
            return []
        plans = []
        for offset, length, feature in features:
            prefix = field_prefix(feature.modality)  # an image's duet_budget, a video's duet_video_budget
            if feature.data is None or prefix + "budget" not in feature.data:
                continue
            budget = int(torch.as_tensor(feature.data[prefix + "budget"].data).reshape(-1)[0])
            method = feature.data.get(prefix + "method")
            settings = self.duet if method is None else self.duet.choose(int(torch.as_tensor(method.data).reshape(-1)[0]))
            plans.append((offset, length, language_plan_for(settings, budget, self.language_geometry(feature))))
        return plans


class DuetTowerMixin(DuetModelMixin):
    """The server's reducer inside a vLLM model, the tower run with taps, and the loop over a batch's
    items (``reduce_items``)."""

    #: vision towers whose layers ``select.layer_scores`` reads.
    tower_types = ("clip_vision_model", "siglip_vision_model")
    #: where a method's stage chooses: among projected tokens (Gemma's, InternVL's), its output
    #: reaching the language model as it is, each token in the slot of the token it stands for; or
    #: among the tower's features (LLaVA's), its output projected by the model's projector.
    chooses_projected = False

    def setup_duet(self, vllm_config) -> None:
        self.read_settings(vllm_config)
        if self.duet.active:
            kind = self.config.vision_config.model_type
            if kind not in self.tower_types:
                raise RefusedMethod(f"duet-vlm's vLLM plugin reads {', '.join(self.tower_types)} towers; this one is {kind!r}")
            if not isinstance(getattr(self.config, "vision_feature_layer", -1), int):
                raise RefusedMethod("duet-vlm supports a single vision feature layer (vision_feature_layer an int)")
            self.duet.reducer()

    def _process_image_input(self, image_input):
        """vLLM's embedding of a batch of images, reduced where a method reduces it (InternVL embeds
        images in ``_process_vision_input``)."""
        return self.reduce_or_embed(image_input, super()._process_image_input)

    def embed_as_vllm(self, image_input):
        """vLLM's own embedding of a batch of images."""
        return super()._process_image_input(image_input)

    def reduce_or_embed(self, parsed, embed: Callable, modality: str = "image"):
        """A batch of ``modality`` reduced where a method reduces it, else ``embed``'s (vLLM's)."""
        fields = self.reduced_fields(parsed, modality)
        return embed(parsed) if fields is None else self.reduce_items(parsed, fields, modality)

    def reduce_items(self, parsed, fields: ItemFields, modality: str = "image") -> list:
        """Each item of a batch reduced by its own method at its own budget, an unreduced one as vLLM
        embeds it: the loop every family shares. The family encodes the batch (``encode``: each
        item's geometry, plan and rows, the tower run once with taps) and says what an item is
        unreduced (``unreduced``) and what its stage reduces (``units``)."""
        project = self.stage_projector(modality)
        outputs = []
        for index, item in enumerate(self.encode(parsed, fields, modality)):
            if item.plan is None:
                outputs.append(self.unreduced(item, modality))
                continue
            text = self.text_embeddings(fields.texts, index)
            parts = []
            for features, scores, keys, maps in self.units(item, modality):
                reduced = reduce_unit(item.plan, features, scores, keys, item.geometry.grid, item.geometry.has_cls,
                                      project, maps, text)
                parts.append(reduced.in_slot_order() if self.chooses_projected else reduced.embeddings)
            outputs.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return outputs

    def encode(self, parsed, fields: ItemFields, modality: str) -> list[Encoded]:
        """Each item of a batch (vLLM's parsed input) with its geometry and plan, encoded as far as
        the family encodes a batch at once (the family's)."""
        raise NotImplementedError

    def unreduced(self, item: Encoded, modality: str) -> torch.Tensor:
        """An item no method reduces: its embeddings as vLLM's own path gives them (the family's)."""
        raise NotImplementedError

    def units(self, item: Encoded, modality: str) -> list[tuple]:
        """What an item's stage reduces: ``(features, scores, keys, maps)`` of each part reduced on its
        own at the item's budget (one, or a Gemma 3 image's blocks), as ``select.reduce_unit`` takes
        them (the family's)."""
        raise NotImplementedError

    def stage_projector(self, modality: str) -> Callable:
        """How a stage's output reaches the language model (see ``chooses_projected``)."""
        return identity if self.chooses_projected else self.multi_modal_projector

    def encoder_layers_of(self) -> list:
        return list(self.vision_tower.vision_model.encoder.layers)

    def run_tower(self, call: Callable[[], object], plans: list) -> Taps:
        """Run the tower (``call``) with taps on its feature layer (the last layer vLLM built) and on
        the other layers the plans' stages read."""
        layers = self.encoder_layers_of()
        depth = self.config.vision_config.num_hidden_layers
        feature = len(layers) - 1
        wanted = {feature}
        for plan in plans:
            if plan is None:
                continue
            for layer in plan.vision.encoder_layers():
                index = encoder_index(layer, depth)
                if index > feature:
                    raise RefusedMethod(
                        f"{type(plan.vision).__name__} reads encoder layer {layer!r} (index {index}), after the feature "
                        f"layer (index {feature}); vLLM does not build the tower past its feature layer"
                    )
                wanted.add(index)
        with torch.no_grad(), tap({index: layers[index] for index in sorted(wanted)}, layers[feature]) as taps:
            call()
        return taps

    def tower_signals(self, taps: Taps, plan: Plan, rows) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Scores and keys of the feature layer for ``rows`` of the tower's units, and the scores of
        the other layers the plan's stage reads (``VisionView.attention``, keyed as the stage names them)."""
        layers = self.encoder_layers_of()
        depth = self.config.vision_config.num_hidden_layers
        has_cls = self.config.vision_config.model_type == "clip_vision_model"
        feature = len(layers) - 1
        received = plan.vision.received
        scores, keys = layer_scores(layers[feature], taps.inputs[feature][rows], has_cls, received=received)
        maps = {}
        for layer in plan.vision.encoder_layers():
            index = encoder_index(layer, depth)
            maps[layer] = layer_scores(layers[index], taps.inputs[index][rows], has_cls, received=received)[0]
        return scores, keys, maps

    def text_embeddings(self, texts, index: int):
        """The language model's input embeddings of image ``index``'s prompt text (``duet_text``)."""
        if texts is None:
            return None
        ids = texts[index] if not isinstance(texts, torch.Tensor) else texts[index]
        ids = torch.as_tensor(ids).reshape(-1).to(device=next(self.parameters()).device, dtype=torch.long)
        return self.language_model.embed_input_ids(ids)
