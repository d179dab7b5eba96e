"""What the model of every family shares under vLLM, written once, a family saying only what differs.

``DuetTowerMixin`` (before vLLM's model class): the server's reducer and the loop over a batch's
items (``reduce_items``: each item's plan, then vLLM's embedding or the method's stage); a family
says how it encodes a batch (``encode``) and what an item is unreduced (``unreduced``) and reduced
(``units``). ``DuetModelMixin``: the server's settings, each batch's item fields (``processor``'s
``ItemFields``), and what duet-vlm's runner asks of a model that drops inside the language model.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from ...geometry import Geometry
from ...plan import Plan
from . import registry
from .options import RefusedMethod, Settings, embedded_runs, field_prefix, language_plan_for, plan_for
from .processor import PIXELS, ItemFields, server_options
from .select import Taps, encoder_index, layer_scores, reduce_unit, tap


def identity(features: torch.Tensor) -> torch.Tensor:
    return features


def tower_groups(tokens: list[int], budget: int) -> list[slice]:
    """Consecutive items whose ``tokens`` (what the tower gives each unreduced) fit ``budget``
    together, each group at least one item: the batches a tower runs under a reducer.

    vLLM's scheduler counts an item against its encoder budget (``max_num_encoder_input_tokens``)
    by its placeholders, which a reduced item has fewer of than the tower runs on: a step may start
    a budget's worth of reduced items, several times what it would start unreduced, and a tower run
    on all of them at once leaves the processor's cache (on Qwen2.5-VL's geometry the reduced servers
    served less from 8 clients to 32 until this: the serving page). Run in these groups, the tower
    never runs more at once than the budget lets an unreduced step run (vLLM's own runner encodes
    EVS's pruned videos one at a time for the same reason).

    >>> tower_groups([576, 576, 576, 576, 64], 2048)
    [slice(0, 3, None), slice(3, 5, None)]
    >>> tower_groups([4096, 10], 2048)
    [slice(0, 1, None), slice(1, 2, None)]
    """
    groups, start, total = [], 0, 0
    for index, count in enumerate(tokens):
        if index > start and total + count > budget:
            groups.append(slice(start, index))
            start, total = index, 0
        total += count
    if tokens:
        groups.append(slice(start, len(tokens)))
    return groups


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


def mark_compiled_graph(vllm_config, stages) -> None:
    """Set the hooks' operators apart in vLLM's compile cache. vLLM keys a saved compiled model
    (``torch_compile_cache/torch_aot_compile/<hash>``) on the engine's configuration, not on what
    Dynamo traced: an unreduced server of the same checkpoint saves under the same key, and where
    vLLM loads saved models (``VLLM_USE_AOT_COMPILE``, its default where loading works) a dropping
    server would load that graph, which holds none of the operators that drop, and serve unreduced
    without a word (or the unreduced server this one's, which fails on operators with no hooks).
    The layers the graph gathers at enter that key through ``additional_config``, which vLLM
    hashes, with the layers whose attention it records (``LanguageStages.trace``). The graph does
    not depend on which method drops or where (the operators ask the hooks at each step), only on
    whether some method reads the layer before a boundary, so servers running other methods on the
    same checkpoint share it where they agree on that."""
    entry = {"language_ops": sorted(stages.traced), "attention_ops": sorted(layer - 1 for layer in stages.scored)}
    config = vllm_config.additional_config
    if isinstance(config, dict):
        config["duet_vlm"] = entry
    elif not vllm_config.model_config.enforce_eager:  # a platform's own object (SupportsHash), which this cannot extend
        from .language import StageNotServed

        raise StageNotServed(f"duet-vlm: a compiled server that drops inside the language model keys its compiled graph "
                             f"through vLLM's additional_config, which is a {type(config).__name__} here, not a dict; "
                             "start it with --enforce-eager, or without that additional_config")


class DuetModelMixin:
    """What every family's vLLM model shares: the server's settings (``read_settings``), each batch's
    item fields, taken out of vLLM's arguments before its ``embed_multimodal`` runs and read by the
    family's embedding of each modality, and, on a family that serves them, what duet-vlm's runner
    asks about methods that drop inside the language model (``duet_language_plans``)."""

    #: what an instance sets, here as before it does: the item fields of the batch being embedded
    #: (``embed_multimodal``), the server's model config (``read_settings``), and on a server that drops
    #: inside the language model its hooks and boundaries (``setup_language``)
    _duet_items: Mapping = MappingProxyType({})
    _duet_model_config = None
    _duet_language = None
    _duet_boundaries: tuple[int, ...] = ()

    def embed_multimodal(self, **kwargs: object):
        self._duet_items = {modality: ItemFields.take(kwargs, modality) for modality in PIXELS}
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._duet_items = {}

    def reduced_fields(self, parsed, modality: str = "image") -> ItemFields | None:
        """The fields of a batch of ``modality`` (vLLM's parsed input) a method reduces; ``None``
        where vLLM embeds it (no method, no budgets, embeddings given)."""
        fields = self._duet_items.get(modality)
        if not self.duet.active or fields is None or fields.budgets is None or parsed["type"] != PIXELS[modality]:
            return None
        return fields

    def item_plans(self, fields: ItemFields, geometries: list[Geometry]) -> list[Plan | None]:
        """Each item's plan at its budget by its own method (``None``: unreduced)."""
        return [plan_for(fields.settings(self.duet, index), budget, geometry)
                for index, (budget, geometry) in enumerate(zip(fields.budgets, geometries))]

    #: where the family does not serve methods that drop inside the language model (its registry entry,
    #: ``registry.Family.language``): why, said to a server started with duet-vlm's worker.
    language_refusal = "its language model is not one the plugin drops in yet"

    @property
    def family(self) -> str:
        """The family's name (its entry of ``registry.FAMILIES``; else its class's)."""
        entry = registry.of(type(self))
        return entry.name if entry is not None else type(self).__name__.removeprefix("Duet").removesuffix("ForConditionalGeneration")

    @property
    def serves_language(self) -> bool:
        """Whether methods that drop inside the language model are served on the family, given
        duet-vlm's worker (``registry.Family.language``); the family says where its items' geometry and
        its decoder layers are (``language_geometry``, ``text_model``, ``language_scheme``)."""
        entry = registry.of(type(self))
        return entry is not None and entry.language

    def read_settings(self, vllm_config) -> Settings:
        """The server's options (``self.duet``). With duet-vlm's worker, on a family that serves
        them, methods that drop inside the language model are served (``setup_language``); elsewhere
        they are refused (with the worker given, naming the family and why it is not served)."""
        from .options import WORKERS

        worker = getattr(vllm_config.parallel_config, "worker_cls", None) in WORKERS
        served = self.serves_language and worker
        not_served = None
        if worker and not self.serves_language:
            not_served = f"{self.family} is not served with dropping inside the language model: {self.language_refusal}"
        self._duet_model_config = vllm_config.model_config
        # the tower's batches under a reducer (``tower_groups``): the encoder budget of vLLM's scheduler
        self._duet_tower_budget = getattr(vllm_config.scheduler_config, "max_num_encoder_input_tokens", None) or 0
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
        drops, boundaries, previous = False, set(), False
        for index in range(len(self.duet.methods)):
            # whether a method drops inside the language model, and by which stage, is not a matter of
            # the budget: half a typical item's tokens (the server's budget may not fit this item)
            settings = self.duet.choose(index)
            plan = language_plan_for(settings, geometry.visual_tokens // 2, geometry)
            if plan is not None:
                check_stage(plan, settings.method)
                drops = True
                previous = previous or plan.language.reads == "previous"
                boundaries.update(layer for layer, _ in plan.schedule.boundaries)
        if drops:
            check_engine(vllm_config)
            self._duet_language = LanguageStages(self, self.language_scheme())
            self._duet_boundaries = tuple(sorted(boundaries))
            # where vLLM compiles the decoder, the layers at which its graph may gather (``LanguageStages.trace``)
            self._duet_language.trace(self.rows_fixed_before(), previous)
            mark_compiled_graph(vllm_config, self._duet_language)

    @property
    def get_model_state_cls(self):
        """vLLM's Model Runner V2 asks the model for the class of its per-step state where the model
        has this member (``resolve_model_state_cls``): present only on a server that drops inside the
        language model, whose state builds the compacted layers' metadata (``language.DuetModelState``,
        vLLM's ``DefaultModelState`` otherwise); elsewhere vLLM chooses as it would."""
        if self.duet_language_stages() is None:
            raise AttributeError("get_model_state_cls")
        from . import language

        config = self._duet_model_config
        if config is not None and (config.is_hybrid or config.is_attention_free):
            raise language.StageNotServed(f"{type(self).__name__}: duet-vlm's Model Runner V2 state is vLLM's DefaultModelState; "
                                          "a hybrid or attention-free model needs its own")
        return lambda: language.DuetModelState

    def rows_fixed_before(self) -> int:
        """The first decoder layer whose output may hold fewer rows than the step: the decoder's own
        loop adds rows of the step to the layers before it (none here)."""
        return 0

    def duet_language_stages(self):
        """The hooks that drop in the decoder layers (``language.LanguageStages``), to which the
        runner hands each step's plan; ``None`` on a server that drops nothing there."""
        return self._duet_language

    def duet_boundaries(self) -> tuple[int, ...]:
        """The decoder layers before which a method the server runs drops (at a typical item):
        where the KV-cache groups that hold the kept tokens only begin (``memory``)."""
        return self._duet_boundaries

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

    def language_scheme(self):
        """The decoder layers as the hooks use them (``language.scheme``: what a layer takes, which
        layers score, slide or share KV, how they compute queries and keys), by the language model's
        config; made once."""
        scheme = self.__dict__.get("_duet_scheme")
        if scheme is None:
            from .language.scheme import scheme_for

            scheme = self.__dict__["_duet_scheme"] = scheme_for(self.config.get_text_config(), self.text_model())
        return scheme

    def duet_attention_layer_names(self) -> tuple[str, ...]:
        """Each decoder layer's attention, as vLLM's per-layer metadata names it: its softmax
        attention's, or its linear attention's (Qwen3.5's Gated-DeltaNet layers, ``linear_attn``);
        made once (the runner asks at every step)."""
        names = self.__dict__.get("_duet_layer_names")
        if names is None:
            scheme = self.language_scheme()
            names = self.__dict__["_duet_layer_names"] = tuple(scheme.layer_name(index) for index in range(len(scheme)))
        return names

    def duet_request_plan(self, mm_features, prompt: int):
        """A request's drops (``language.RequestPlan``; ``None`` where none of its items drops inside
        the language model) from vLLM's ``MultiModalFeatureSpec`` of its items and its prompt's length:
        each run of an item's embeddings is one item where the family makes its runs items of their own
        (a Qwen3-VL video's temporal slices, a Gemma 3 image's pan-and-scan blocks), and an item of
        several runs is refused elsewhere."""
        from .language import StageNotServed, request_plan

        features = []
        for feature in mm_features or []:
            runs = embedded_runs(feature.mm_position)
            if len(runs) != 1 and not self.runs_are_items(feature.modality):
                raise StageNotServed(f"an item whose embeddings are not one run of the prompt ({feature.modality}: "
                                     f"{len(runs)} runs) is not served dropping inside the language model")
            features += [(offset, length, feature) for offset, length in runs]
        return request_plan(self.duet_language_plans(features), prompt)

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

    def in_tower_groups(self, run: Callable[[torch.Tensor], object], units, tokens: int) -> list:
        """``run`` on consecutive slices of ``units`` (the tower's batch, ``tokens`` placeholders each
        unreduced) in the groups ``tower_groups`` makes of them, their results in order (``tap``
        concatenates a call's taps over the groups)."""
        return [run(units[group]) for group in tower_groups([tokens] * len(units), self._duet_tower_budget)]

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
