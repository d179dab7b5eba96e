"""PIO-FVLM / TRIO (arXiv 2602.04657): the official algorithm (``ocy1/TRIO`` ``ec85d99``).

Inside the language model, the visual tokens a layer-local proxy of the model's own next-token
prediction is most sensitive to are kept, and saliency-ordered non-maximum suppression keeps near
duplicates from crowding out the budget. Before it, TRIO's vision-encoder scan (``TrioScan``)
shortens the language model's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..geometry import Geometry
from ..options import check_number
from ..plan import LanguageStage, LayerView, Plan
from ..schedule import Schedule, scaled_boundaries, solve_llm_input
from ..selection import gather_tokens
from .registry import register_method
from .shapes import ScanThenPrune

PROBES = ("next", "boundary")
# The official "w/o VE" schedules (LLaVA-1.5: 576 tokens, 32 layers), pruning after layers 1, 10, 15:
# scripts/v1_5/eval/*.sh at budget 128, textvqa_set1/2.sh and the comment above layer_prune at 64.
LLM_ONLY_LAYERS = (1 / 32, 10 / 32, 15 / 32)
LLM_ONLY_PUBLISHED = {(576, 32, 128): (218, 128, 54), (576, 32, 64): (92, 54, 22)}


def saliency_nms(saliency: torch.Tensor, features: torch.Tensor, keep: int, threshold: float = 0.8) -> torch.Tensor:
    """Saliency-ordered non-maximum suppression in feature space; ``(..., keep)`` ascending indices.

    The official ``layer_prune`` rule: walk the tokens by decreasing saliency, keep each one not yet
    suppressed and suppress every token whose cosine similarity to it is at least ``threshold``
    (itself included), until ``keep`` are kept; if fewer survive, the most salient suppressed tokens
    fill the remaining places. Ties in saliency go to the lower index (the official ``argsort`` is
    not stable; only exact ties differ). ``threshold > 1`` is plain top-k.

    Args:
        saliency: ``(..., n)`` importance of each token.
        features: ``(..., n, d)`` token features; only their directions matter.
        keep: tokens to return per row, ``0 <= keep <= n``.
        threshold: cosine similarity at which a token counts as a duplicate of a kept one (official 0.8).

    >>> saliency_nms(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), 2)
    tensor([0, 2])
    """
    n = saliency.shape[-1]
    if features.shape[:-1] != saliency.shape:
        raise ValueError(f"features {tuple(features.shape)} do not match saliency {tuple(saliency.shape)}")
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} tokens")
    lead = saliency.shape[:-1]
    scores = saliency.detach().float().reshape(-1, n)
    units = F.normalize(features.detach().float().reshape(-1, n, features.shape[-1]), dim=-1)
    similarity = units @ units.transpose(1, 2)
    rows = torch.arange(scores.shape[0], device=scores.device)
    available = torch.ones_like(scores, dtype=torch.bool)
    kept = torch.zeros_like(available)
    for _ in range(keep):
        masked = scores.masked_fill(~available, float("-inf"))
        best = masked.argmax(dim=-1)  # first maximum: ties go to the lower index
        picked = available[rows, best]
        if not picked.any():
            break
        kept[rows[picked], best[picked]] = True
        duplicates = similarity[rows, best] >= threshold
        available &= ~(duplicates & picked[:, None])
        available[rows[picked], best[picked]] = False
    # NMS survivors first, then the rest by saliency: a stable sort on saliency, then on the tier.
    by_saliency = scores.argsort(dim=-1, descending=True, stable=True)
    tier = (~kept).gather(1, by_saliency).long()
    order = by_saliency.gather(1, tier.argsort(dim=-1, stable=True))
    return order[:, :keep].sort(dim=-1).values.reshape(*lead, keep)


def proxy_positions(valid: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count)``: the positions whose logits enter the proxy loss, the ``count`` before each
    row's last valid token (S-5..S-2 for the official 4: the last prompt token is not used).

    >>> proxy_positions(torch.tensor([[False, True, True, True, True, True, True]]), 4).tolist()
    [[2, 3, 4, 5]]
    """
    length = valid.shape[1]
    last = length - 1 - valid.flip(1).long().argmax(dim=1)  # each row's last valid position
    positions = last[:, None] - count + torch.arange(count, device=valid.device)[None]
    return positions.clamp(min=0)


@dataclass
class SaliencyNMSPrune(LanguageStage):
    """PIO's language stage: the gradient of a layer-local proxy loss scores every token, NMS keeps.

    At a boundary a decoder layer runs on a detached, gradient-requiring copy of the boundary's
    hidden states (the *probe*); the model's own final norm and LM head read its output at the
    ``proxy_tokens`` positions before each row's last token; the loss is the mean cross-entropy
    against their own argmax, and the L2 norm of its gradient with respect to the hidden states
    (never the parameters) is each visual token's saliency. ``saliency_nms`` on the L2-normalised
    hidden states chooses the survivors.

    ``probe="next"`` runs the next decoder layer (the official LLaVA path); ``"boundary"`` runs the
    layer that just ran once more, on its own output (the official Qwen2.5-VL path).

    >>> stage = SaliencyNMSPrune(threshold=0.8, proxy_tokens=4)
    >>> stage.select(view, keep=32).shape                 # doctest: +SKIP
    torch.Size([1, 1, 32])
    """

    reads: ClassVar[str | None] = None  # runs a layer on a probe copy: no layer's attention
    view_needs: ClassVar[frozenset[str]] = frozenset({"run_layer"})  # and the output head on it

    threshold: float = 0.8
    proxy_tokens: int = 4
    probe: str = "next"

    def __post_init__(self) -> None:
        check_number("threshold", self.threshold, low=-1, high=1, kind="a cosine similarity")
        check_number("proxy_tokens", self.proxy_tokens, integer=True, low=0, low_open=True)
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {self.probe!r}")

    def score(self, view: LayerView) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("PIO needs a backward pass through one block: use torch.no_grad(), not inference_mode()")
        with torch.enable_grad():
            x = view.hidden_states.detach().requires_grad_()
            y = view.run_layer(x, previous=self.probe == "boundary")
            positions = proxy_positions(view.valid, self.proxy_tokens)
            logits = view.output_head(y.gather(1, positions[..., None].expand(-1, -1, y.shape[-1]))).float()
            logits = logits.reshape(-1, logits.shape[-1])
            # The mean over every row's positions, as the official code: a row's gradient is scaled
            # by the batch, never its ranking, so a row selects what it selects alone.
            loss = F.cross_entropy(logits, logits.argmax(dim=-1))
            try:
                (grad,) = torch.autograd.grad(loss, x)
            except RuntimeError as error:
                if "use_reentrant" not in str(error):
                    raise
                raise RuntimeError(
                    "PIO differentiates one block with torch.autograd.grad, which reentrant checkpointing does not "
                    "support: enable checkpointing with gradient_checkpointing_kwargs={'use_reentrant': False}"
                ) from error
        return gather_tokens(grad, view.visual_index).float().norm(dim=-1)

    def select(self, view: LayerView, keep: int) -> torch.Tensor:
        saliency = self.score(view)
        features = gather_tokens(view.hidden_states.detach(), view.visual_index)
        return saliency_nms(saliency, features, keep, self.threshold)


@register_method("pio")
@dataclass
class PIO(ScanThenPrune):
    """PIO-FVLM / TRIO (Ouyang et al., 2026), the official algorithm (``ocy1/TRIO``, ``ec85d99``).

    A vision-encoder scan (``TrioScan``: half the tokens by windows of a shallow layer's CLS
    attention, half by a deep layer's, every other token merged into its nearest kept one after the
    projector) shortens the language model's input to ``N``; at each boundary ``SaliencyNMSPrune``
    keeps the tokens the model's own prediction is most sensitive to, without near duplicates.

    As the official code runs it (``llava/model/modeling_llama_x.py`` ``layer_prune``,
    ``llava/model/llava_arch.py`` ``encode_images``, ``qwen/model/qwen2_5_vl_custom.py``):

    - Proxy loss: the probe's logits at the 4 positions before the last prompt token (S-5..S-2 of
      the sequence; the last token itself is not used), pseudo-labels their argmax, the mean
      cross-entropy over the batch's positions; saliency = L2 norm of the gradient at the boundary's
      hidden states. Probe: the next decoder layer (LLaVA); on M-RoPE models (the Qwen2.5-VL path)
      the layer that just ran, once more on its own output.
    - NMS: cosine similarity of the L2-normalised hidden states, suppress at ``>= 0.8`` (self
      included), fill up from the suppressed tokens by saliency.
    - Positions: renumbered after every drop (decoding positions shifted per layer group); under
      M-RoPE kept tokens keep their 3-D positions (the Qwen path gathers them).

    Schedules (budget = average visual tokens per decoder layer per image):

    - ``vision=True`` (default, "w/ VE"): ``N`` is solved so that ``N`` for the first half of the
      layers and ``round(N / 3)`` after it average the budget: 64 -> 96 -> 32 after layer 16 (the
      official README default), 128 -> 192 -> 64 and 192 -> 288 -> 96 (not published: the same
      shape). On M-RoPE models the kept count after the boundary is ``int(0.333 * N)``, as the
      official Qwen code computes it from its README's ratio (``PIO.qwen_reference()`` is that
      setting: 0.167 of each image's tokens after the encoder, x0.333 at layer 14 of 28).
    - ``vision=False`` ("w/o VE"): three boundaries, after layers 1, 10 and 15 of 32 (scaled to the
      depth), keeping the official ``(218, 128, 54)`` at 128 and ``(92, 54, 22)`` at 64 on LLaVA-1.5;
      other budgets keep the proportions of the 128 schedule, the first count solved. The least it
      averages is the first layer's full count over the depth (18 on LLaVA-1.5).
    - Explicit: ``llm_input`` (N), ``layers`` (1-based boundaries) and ``keep`` (absolute counts)
      or ``ratios`` (of the current count, ``int(r * n)``) override the solver, e.g.
      ``make("pio", vision=True, llm_input=96, layers=(16,), keep=(32,))`` is the README default and
      ``make("pio", vision=False, layers=(1, 10, 15), keep=(218, 128, 54))`` the eval scripts'.

    Where this differs from the released code, by choice: a left-padded batch equals each row run
    alone (the official code needs right padding and decodes at batch 1); proxy positions count from
    each row's last valid token. Facts of the released code not copied: ``modeling_llama_x.py`` uses
    ``np`` and ``nullcontext`` without importing them (every boundary raises ``NameError`` as
    published), and prints a ``[DEBUG]`` line at every boundary.

    Args:
        budget: average visual tokens per decoder layer per image.
        vision: run the vision-encoder scan first ("w/ VE").
        llm_input: explicit N (the scan's output per image); ``vision_ratio``: N as a fraction of
            each image's tokens (``int(r * tokens)``, the official Qwen option).
        layers, keep, ratios: explicit boundaries (1-based) and kept counts or fractions.
        threshold: NMS threshold (official 0.8); proxy_tokens: positions in the proxy loss (official 4).
        probe: ``"next"`` or ``"boundary"``; ``None``: the model path's (``"boundary"`` under M-RoPE).
        window, local_share, local_layer, global_layer: the scan's options (``TrioScan``).

    >>> reducer = PIO(budget=64)                                  # 96 tokens, 32 after layer 16
    >>> with reducer(model): model.generate(**inputs)             # doctest: +SKIP
    """

    vision: bool = True
    threshold: float = 0.8
    proxy_tokens: int = 4
    probe: str | None = None

    ceiling_hint: ClassVar[str] = "use vision=False or larger ratios"

    def __post_init__(self) -> None:
        if not isinstance(self.vision, bool):
            raise ValueError(f"vision must be True or False, got {self.vision!r}")
        if not self.vision and (self.llm_input is not None or self.vision_ratio is not None):
            raise ValueError("llm_input and vision_ratio set the vision scan's output: they need vision=True")
        super().__post_init__()
        self.language_stage()  # validate the stage options now rather than at attach time

    def language_stage(self, geometry: Geometry | None = None) -> SaliencyNMSPrune:
        probe = self.probe or ("boundary" if geometry is not None and geometry.rope == "mrope" else "next")
        return SaliencyNMSPrune(self.threshold, self.proxy_tokens, probe)

    def language_stage_for(self, geometry: Geometry) -> SaliencyNMSPrune:
        return self.language_stage(geometry)

    def encoder_layers(self, geometry: Geometry) -> tuple:
        return super().encoder_layers(geometry) if self.vision else ()

    def plan(self, geometry: Geometry) -> Plan:
        if self.vision:
            return super().plan(geometry)
        schedule = self._llm_only(geometry)
        return Plan(schedule, None, self.language_stage(geometry) if schedule.boundaries else None)

    def _llm_only(self, geometry: Geometry) -> Schedule:
        """The "w/o VE" schedule: every token enters, three boundaries (or the explicit ones)."""
        visual = geometry.visual_tokens
        if self.keep is not None or self.ratios is not None:
            return self.schedule_for(geometry, visual)
        if self.budget is None:
            raise ValueError("PIO needs a budget (or keep / ratios)")
        layers = self.layers if self.layers is not None else geometry.snap(
            scaled_boundaries(geometry.num_layers, LLM_ONLY_LAYERS), SaliencyNMSPrune.reads
        )
        published = LLM_ONLY_PUBLISHED.get((visual, geometry.num_layers, self.budget))
        if published is not None and self.layers is None:
            return Schedule(geometry.num_layers, visual, visual, tuple(zip(layers, published)))
        shape = LLM_ONLY_PUBLISHED[(576, 32, 128)][: len(layers)]

        def build(first: int) -> Schedule:
            keeps = tuple(min(visual, round(first * k / shape[0])) for k in shape)
            return Schedule(geometry.num_layers, visual, visual, tuple(zip(layers, keeps)))

        minimum, maximum = build(0).average, build(visual).average
        if self.budget > maximum + 1:
            raise ValueError(
                f"PIO without the vision scan (vision=False) averages at most {maximum:g} visual tokens per layer "
                f"with boundaries {layers} on {geometry.num_layers} layers (budget {self.budget}); give later "
                "layers or explicit keep counts"
            )
        if self.budget < minimum - 1:
            raise ValueError(
                f"PIO without the vision scan (vision=False) cannot average fewer than {minimum:g} visual "
                f"tokens per layer with boundaries {layers} on {geometry.num_layers} layers (budget {self.budget}); "
                "use vision=True or earlier layers"
            )
        return solve_llm_input(self.budget, build)
