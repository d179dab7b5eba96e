"""DUET-VLM (CVPR 2026): dual-stage visual token reduction, as in the official code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..geometry import Geometry
from ..options import check_number, check_numbers
from ..salient import salient_token_positions
from ..schedule import ratio_schedule, scaled_boundaries
from .base import (
    LanguageStage,
    LayerView,
    Plan,
    Reducer,
    check_budget,
    compose_plan,
    per_unit,
)
from .registry import register_method
from .stages import (  # noqa: F401 - shared with VisionZip, re-exported
    CONTEXTUAL_SHARE,
    DominantContextualMerge,
    check_stage_a_counts,
    contextual_count,
)

# The splits the paper's LLaVA-1.5 runs used (official eval and README): 300 + 7 at budget 192 and
# 170 + 35 at budget 128. Elsewhere contextual tokens take VisionZip's share (10 of every 64).
# Keyed by (tokens per unit, kept per unit). The reference's Video-LLaVA runs keep 160 + 32 per
# frame (CLS included); transformers' video tower keeps CLS in each frame's 257 tokens.
PUBLISHED_SPLITS = {(576, 307): (300, 7), (576, 205): (170, 35), (257, 192): (160, 32)}


Query = str | Callable[[LayerView], list[torch.Tensor]]


@dataclass
class TextGuidedPrune(LanguageStage):
    """Stage B (T2V): keep the visual tokens the prompt's text attends to most.

    Scores with the next layer's norm, q/k projections and RoPE: a full-row causal softmax of the
    query rows over all keys, averaged over heads and queries. Queries:

    - ``"text"`` (default, the reference's): every prompt token after the image (in training, the
      instruction tokens only);
    - ``"salient"``: question words, content words and ``? ! :`` (``duet_vlm.salient``) plus the last
      token; needs ``tokenizer``;
    - ``"last"``: the last prompt token (PyramidDrop's rule);
    - a callable ``view -> [positions per row]``.

    >>> TextGuidedPrune(query="salient", tokenizer=processor.tokenizer)   # doctest: +SKIP
    """

    query: Query = "text"
    tokenizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.query) and self.query not in ("text", "salient", "last"):
            raise ValueError(f"query must be 'text', 'salient', 'last' or a callable, got {self.query!r}")
        if self.query == "salient" and self.tokenizer is None:
            raise ValueError("query='salient' needs the tokenizer to find words: TextGuidedPrune(tokenizer=...)")

    @property
    def view_needs(self) -> frozenset[str]:  # what the query reads besides the layer's attention
        if callable(self.query):  # the caller's own: it may read anything of the view
            return frozenset({"input_ids", "run_layer", "position_embeddings"})
        return frozenset({"input_ids"}) if self.query == "salient" else frozenset()

    def queries(self, view: LayerView) -> list[torch.Tensor]:
        if callable(self.query):
            return self.query(view)
        if self.query == "last":
            return [index.view(1) for index in view.last_index]
        if self.query == "text":
            return view.text_after_image
        chosen = []
        for row, positions in enumerate(view.text_after_image):
            tokens = self.tokenizer.convert_ids_to_tokens(view.input_ids[row, positions].tolist())
            chosen.append(positions[salient_token_positions(tokens)])
        return chosen

    def score(self, view: LayerView) -> torch.Tensor:
        return view.text_to_visual_attention(self.queries(view))


@dataclass
class TextGuidedStates(TextGuidedPrune):
    """Stage B without attention weights (``Duet(scores="states")``): keep the visual tokens whose
    states lie closest to the prompt text's, in the residual stream entering the boundary layer.

    Each visual token's score is its cosine similarity to each query token (the same queries as
    ``TextGuidedPrune``), averaged over the queries, in float32. It is the text-to-visual attention
    logit with the layer's projections, norm and RoPE taken out (``x_q . x_v`` in place of
    ``W_q x_q . W_k x_v``), on unit vectors, so that a few tokens of large norm do not rank first
    for their norm. It reads no layer's attention: nothing is computed again at a boundary, under
    FlashAttention or in vLLM. An option, not the published Stage B: on the demo evaluation it keeps
    80-82 % of full where the published Stage B keeps 94-95 % (``docs/choosing.md``).
    """

    reads: ClassVar[str | None] = None  # the boundary's residual stream only

    def score(self, view: LayerView) -> torch.Tensor:
        states = torch.nn.functional.normalize(view.hidden_states.float(), dim=-1)
        rows = []
        for row, positions in enumerate(self.queries(view)):
            text = states[row, positions].mean(0)  # (D): the mean of the queries' unit vectors
            rows.append(states[row][view.visual_index[row]] @ text)  # (n_images, n)
        return torch.stack(rows)


@register_method("duet")
@dataclass
class Duet(Reducer):
    """DUET-VLM (Singh et al., CVPR 2026): merge on the vision side, then prune inside the LLM.

    Stage A keeps ``dominant`` tokens (CLS included) by CLS attention and ``contextual`` merged tokens
    before the projector; Stage B drops visual tokens after the boundary ``layers`` keeping
    ``int(n * ratio)`` of the ``n`` Stage-A tokens, scored by attention from the prompt text.

    Args:
        budget: average visual tokens per decoder layer per image. With the default schedule
            (boundaries at 1/2 and 3/4 of depth, ratios 0.5 and 0.0) LLaVA-1.5 gets the paper's
            configurations: 192 -> 300 + 7 tokens, 307/153/0 per layer group; 128 -> 170 + 35.
        dominant, contextual: explicit Stage-A counts (dominant includes CLS); override the solver.
        cluster_width: pool width for contextual anchors (reference 4); ``None`` = VisionZip anchors.
        layers: boundaries, as counts of layers completed (reference ``(16, 24)`` on 32 layers);
            ``()`` disables Stage B.
        ratios: kept fraction of the Stage-A count after each boundary (reference ``(0.5, 0.0)``).
        query: Stage-B query tokens, see ``TextGuidedPrune``; ``tokenizer`` for ``"salient"``.
        scores: ``"attention"`` (the published Stage B: the text's attention, ``TextGuidedPrune``) or
            ``"states"`` (no attention weights: the text's cosine similarity in the residual
            stream, ``TextGuidedStates``).
        vision_scores: what ranks Stage A's dominant tokens: ``"attention"`` (the published rule: the
            CLS token's attention; on a tower without a CLS token the adapter's substitute, the attention
            each token's patches receive in the last full-attention block) or ``"norm"`` (each token's
            feature norm; ``docs/methods.md`` compares the two on the Qwen2.5-VL demo model).
        positions: ``"contiguous"`` (the reference: renumbered after each drop) or ``"original"``;
            ``None`` (default): contiguous on 1-D RoPE models, original under M-RoPE (Qwen-VL),
            where renumbering is refused.

    >>> reducer = Duet(budget=64)                                 # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)             # doctest: +SKIP
    >>> reducer.stats.tokens_per_layer                            # doctest: +SKIP
    """

    budget: int | None = None
    dominant: int | None = None
    contextual: int | None = None
    cluster_width: int | None = 4
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    query: Query = "text"
    tokenizer: Any = field(default=None, repr=False)
    scores: str = "attention"
    vision_scores: str = "attention"

    runtime_fields: ClassVar[tuple[str, ...]] = ("tokenizer",)

    def __post_init__(self) -> None:
        super().__post_init__()
        explicit = self.dominant is not None and self.contextual is not None
        check_budget(self.budget, required=not explicit)
        check_stage_a_counts(self.dominant, self.contextual)
        check_number("cluster_width", self.cluster_width, integer=True, low=1, optional=True)
        self.layers = check_numbers("layers", self.layers, integer=True, low=1, optional=True)
        # Numbers here; the schedule checks that they lie in [0, 1] when planning.
        self.ratios = check_numbers("ratios", self.ratios, optional=True)
        if (self.layers is None) != (self.ratios is None) and self.layers != ():
            raise ValueError("give both layers and ratios (or neither, for the default schedule)")
        if self.ratios is None and self.layers == ():
            self.ratios = ()
        # Validate the stage options now rather than at attach time.
        self.language_stage()
        DominantContextualMerge(score=self.vision_scores)

    def _default_shape(self, geometry: Geometry) -> tuple[tuple[int, ...], tuple[float, ...]]:
        layers = self.layers if self.layers is not None else geometry.snap(
            scaled_boundaries(geometry.num_layers, (0.5, 0.75)), TextGuidedPrune.reads
        )
        ratios = tuple(self.ratios) if self.ratios is not None else (0.5, 0.0)[: len(layers)]
        return tuple(layers), ratios

    def schedule_for(self, geometry: Geometry, llm_input: int):
        layers, ratios = self._default_shape(geometry)
        return ratio_schedule(geometry.num_layers, geometry.visual_tokens, llm_input, layers, ratios)

    def language_stage(self) -> TextGuidedPrune:
        if self.scores not in ("attention", "states"):
            raise ValueError(f"scores must be 'attention' (the published Stage B) or 'states', got {self.scores!r}")
        stage = TextGuidedStates if self.scores == "states" else TextGuidedPrune
        return stage(query=self.query, tokenizer=self.tokenizer)

    def vision_stage_for(self, geometry: Geometry, keep: int) -> DominantContextualMerge:
        keep = per_unit(geometry, keep)
        published = PUBLISHED_SPLITS.get((geometry.unit_tokens, keep))
        default = published[1] if published else round(keep * CONTEXTUAL_SHARE)
        contextual = contextual_count(keep, self.dominant, self.contextual, default)
        return DominantContextualMerge(contextual=contextual, cluster_width=self.cluster_width, score=self.vision_scores)

    @classmethod
    def qwen_reference(cls, **overrides: Any) -> "Duet":
        """The reference's Qwen2.5-VL-7B evaluation setting (``qwen2_5_vl/eval_benchmarks.py``):
        540 dominant + 100 contextual merged tokens per image (cluster width 4), then 0.5 and 0.25
        of them after decoder layers 14 and 21 (of 28), original M-RoPE positions. Images with
        fewer tokens than 640 pass Stage A whole.

        >>> with Duet.qwen_reference()(model): model.generate(**inputs)   # doctest: +SKIP
        """
        settings = dict(dominant=540, contextual=100, cluster_width=4, layers=(14, 21), ratios=(0.5, 0.25))
        return cls(**{**settings, **overrides})

    def plan(self, geometry: Geometry) -> Plan:
        if self.dominant is not None and self.contextual is not None:
            # Explicit counts are per unit: per image, or per frame of a video. A unit with no more
            # tokens than that passes Stage A whole (Qwen images come in any size).
            stage_a = (self.dominant + self.contextual) * geometry.units
            if stage_a >= geometry.visual_tokens:
                schedule = self.schedule_for(geometry, geometry.visual_tokens)
                language = self.language_stage() if schedule.boundaries else None
                return Plan(schedule, None, language)
            schedule = self.schedule_for(geometry, stage_a)
            language = self.language_stage() if schedule.boundaries else None
            return Plan(schedule, self.vision_stage_for(geometry, schedule.llm_input), language)
        return compose_plan(self, self, self.budget, geometry)
