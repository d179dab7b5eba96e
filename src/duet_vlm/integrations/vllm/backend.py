"""A prototype: duet-vlm's vision-side reduction through vLLM's Transformers modeling backend
(``--model-impl transformers``, ``TransformersMultiModalForCausalLM``), for LLaVA-1.5 only.

The backend runs the Hugging Face model itself inside vLLM: its processor asks transformers'
processor where each image's placeholders go (``text_replacement_offsets``) and its
``embed_multimodal`` calls the model's own ``get_image_features``. Two things make it reduce, as on
vLLM's own classes (``llava``): each image's run of placeholders is cut to the method's count
(``_get_prompt_updates``), and ``embed_multimodal`` runs the Hugging Face tower with taps on its
feature layer, scores it and hands the method's stage to ``select.reduce_unit`` with the model's
own projector. The tower is not transformers' code as it is: the backend rewrites each attention's
``q_proj``, ``k_proj`` and ``v_proj`` into vLLM's fused ``qkv_proj`` (its "fusers"), so the scores are
read from that, as on vLLM's own classes (``select.layer_scores``).

What it shows (the serving page): the backend carries a reduction with no vLLM model class, but
not "every family at once": the placeholder count of each image still needs the family's geometry
before the encoder runs (LLaVA-1.5's is fixed; anyres tiles, Qwen grids and InternVL tiles each
need their own, which the plugin's classes already carry), and the Qwen families' M-RoPE positions
are numbered by the backend before the encoder runs. A server asking the backend to reduce any
other family is refused at start, as before; so are methods whose stage reads another encoder layer
(TRIO's scan, VScan, PIO), which the prototype does not tap.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM
from vllm.model_executor.models.transformers.multimodal import (
    MultiModalDummyInputsBuilder,
    MultiModalProcessingInfo,
    MultiModalProcessor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...adapters.llava import llava_geometry
from ...geometry import Geometry
from .options import RefusedMethod, Settings, plan_for
from .processor import DuetProcessorMixin, ItemFields, cut_runs, item_fields_config, server_options
from .refused import BACKEND, refuse_options
from .select import layer_scores, reduce_unit, tap

#: the families the prototype reduces (the model type of the checkpoint's config).
REDUCED = ("llava",)


def backend_geometry(config) -> Geometry:
    if config.model_type not in REDUCED:
        raise RefusedMethod(f"duet-vlm reduces {', '.join(REDUCED)} through {BACKEND}; this model is {config.model_type!r}")
    return llava_geometry(config)


class DuetBackendProcessor(DuetProcessorMixin, MultiModalProcessor):
    """The backend's processor with each image's placeholder run cut to the method's count."""

    def item_geometry(self, modality: str, sizes) -> Geometry:
        return backend_geometry(self.info.get_hf_config())

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        # The backend attributes every processor output to a modality by name: duet-vlm's fields are
        # configured here, out of its sight.
        ours = {key: hf_inputs.pop(key) for key in list(hf_inputs) if key.startswith("duet_")}
        try:
            fields = MultiModalProcessor._get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs)
        finally:
            hf_inputs.update(ours)
        return {**fields, **item_fields_config(hf_inputs)}

    def placeholders(self, update, item_idx: int, item, count: int):
        """The processor's replacement (all the image's placeholders) cut to ``count``."""
        return cut_runs(update.replacement(item_idx), self.info.get_hf_config().image_token_index, count)


@MULTIMODAL_REGISTRY.register_processor(
    DuetBackendProcessor, info=MultiModalProcessingInfo, dummy_inputs=MultiModalDummyInputsBuilder
)
class DuetTransformersMultiModalForCausalLM(TransformersMultiModalForCausalLM):
    """vLLM's Transformers backend reducing LLaVA-1.5's images (refusing duet-vlm's options elsewhere)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        # Every refusal comes before the backend builds anything (it compiles transformers' model
        # classes for the whole process).
        config = vllm_config.model_config.hf_config
        if config.model_type not in REDUCED:
            refuse_options(vllm_config, BACKEND)
        duet = Settings.read(server_options(vllm_config.model_config))
        if duet.active:
            duet.reducer()
            vision = config.vision_config
            if vision.model_type != "clip_vision_model" or config.vision_feature_select_strategy != "default":
                raise RefusedMethod(f"duet-vlm's {BACKEND} prototype reduces CLIP towers with the 'default' strategy")
            if not isinstance(config.vision_feature_layer, int):
                raise RefusedMethod("duet-vlm supports a single vision feature layer")
            if vllm_config.parallel_config.tensor_parallel_size > 1:
                # the fused projections would hold one rank's heads, which the scores do not gather here
                raise RefusedMethod(f"duet-vlm's {BACKEND} prototype runs without tensor parallelism; vLLM's own "
                                    "implementation reduces under --tensor-parallel-size")
            geometry = backend_geometry(config)
            for index, name in enumerate(duet.methods):
                plan = plan_for(duet.choose(index), 64, geometry)
                if plan is not None and plan.vision.encoder_layers():
                    raise RefusedMethod(f"{name} reads encoder layers besides the feature layer, which the {BACKEND} "
                                        "prototype does not tap; serve it with vLLM's own implementation")
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.duet = duet

    def embed_multimodal(self, **kwargs):
        fields = ItemFields.take(kwargs)
        pixel_values = kwargs.get("pixel_values")
        if not self.duet.active or fields.budgets is None or pixel_values is None:
            return super().embed_multimodal(**kwargs)
        model = self.model  # transformers' LlavaModel
        config = model.config
        tower = model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        feature = config.vision_feature_layer % (len(layers) + 1) - 1  # hidden_states[k]: layer k - 1's output
        geometry = backend_geometry(config)
        with tap({feature: layers[feature]}, layers[feature]) as taps:
            with torch.no_grad():
                model.vision_tower(pixel_values)
        outputs = []
        for index, budget in enumerate(fields.budgets):
            features = taps.output[index : index + 1]
            plan = plan_for(fields.settings(self.duet, index), budget, geometry)
            if plan is None:
                outputs.append(model.multi_modal_projector(features[0, 1:]))
                continue
            # the backend rewrote the tower's q/k/v projections into vLLM's fused ``qkv_proj``
            scores, keys = layer_scores(layers[feature], taps.inputs[feature][index : index + 1], True,
                                        received=plan.vision.received)
            text = None
            if fields.texts is not None:
                ids = torch.as_tensor(fields.texts[index]).reshape(-1).to(features.device, torch.long)
                text = model.get_input_embeddings()(ids)
            outputs.append(reduce_unit(plan, features, scores, keys, geometry.grid, geometry.has_cls,
                                       model.multi_modal_projector, {}, text).embeddings)
        return outputs
