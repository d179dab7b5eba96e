"""Speed measured side by side: the vision-side overhead of Stage A and the prefill per method
(``duet-vlm bench``), and a family's typical prompt (``duet-vlm bench --family``), each reduced
prefill against the unreduced one and against its *ideal*.

Every variant is timed in the same process, interleaved round by round (``timing``). The ideal of a
variant (``ideal.IdealModel``) is the unpatched model on the same per-layer visual token counts with
nothing choosing them: the tower on every tile or frame, the projector on the kept tokens, the
decoder's own layers. So ``forward - ideal`` is what the method's choosing costs (scoring,
selecting, merging, the hooks' bookkeeping), ``unreduced - ideal`` what its token counts save, and a
method whose forward takes at least the unreduced forward's time does not pay on that geometry
(``selection_costs``). FLOPs and KV-cache bytes, which are exact, are reported next to them, and the
selection's own FLOPs where a method's count is declared (``selection``).

>>> results = prefill_benchmark(ModelSize(), ["duet"], [192, 64], rounds=3)           # doctest: +SKIP
>>> results["prefill"]["duet 64"]["selection_cost_s"], results["prefill"]["duet 64"]["pays"]   # doctest: +SKIP
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext
from itertools import groupby
from typing import Callable

import torch

from ..flops import DecoderDims, exact_flops, layer_cache_bytes, layer_flops
from ..methods import PerItemRatio, make
from .ideal import IdealModel
from .models import ModelSize, build_family, build_model, example_inputs
from .selection import ProjectorRows, Widths, declared_flops, item_shapes, projector_flops_per_row
from .timing import (LanguageModelTimer, LayerKindTimer, interleaved, median_ratio, paired_rounds, pairs_swapped,
                     processor, round_pairs)

FULL = "no reduction"


def projector_of(model) -> torch.nn.Module:
    """The module mapping visual features into the language model's space: the
    ``multi_modal_projector`` (LLaVA families, InternVL, Gemma 3), Gemma 4's ``embed_vision`` or
    Qwen3.5's 2x2 merger."""
    base = model.model
    for name in ("multi_modal_projector", "embed_vision"):
        if hasattr(base, name):
            return getattr(base, name)
    return base.visual.merger


class _ProjectorRows(ProjectorRows):
    """``ProjectorRows`` on ``projector_of(model)``."""

    def __init__(self, model):
        self.projector, self.count = projector_of(model), 0


def vision_variants(model, inputs, budget: int) -> dict[str, Callable[[], None]]:
    """The tower + projector alone: plain, under DUET's hooks, and the official code's way of scoring."""
    pixels = inputs["pixel_values"]
    reducer = make("duet", budget=budget)

    def plain():
        with torch.inference_mode():
            model.get_image_features(pixel_values=pixels)

    def duet():
        with torch.inference_mode(), reducer(model):
            model.get_image_features(pixel_values=pixels)

    tower = model.model.vision_tower

    def eager_with_attention_maps():
        # The official Stage A runs every CLIP layer eagerly and returns all attention maps.
        previous = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            with torch.inference_mode():
                tower(pixels, output_attentions=True, output_hidden_states=True)
        finally:
            tower.set_attn_implementation(previous)

    return {FULL: plain, f"duet {budget} (hooks)": duet, "eager + attention maps": eager_with_attention_maps}


def timed_prefill(model, inputs, context_factory, decoder_seconds: list[float],
                  kind_seconds: list[dict] | None = None) -> Callable[[], None]:
    """One prefill forward (logits of the last token only, as generate does) inside
    ``context_factory()``; appends the seconds it spent in the language model to ``decoder_seconds``
    (and, with ``kind_seconds``, in its layers of each kind: ``LayerKindTimer``). The language model
    is timed from after the reducer's entry hook (the vision side's step, which ``forward_s``
    counts) to after its exit hook, the layers from after a boundary's hook: what lies between
    the two timers is the runtime's own work inside the language model (``outside_layers_s``).

    Under ``torch.no_grad()``, as ``generate`` runs, not ``inference_mode``: PIO's score is a
    backward pass through one block, which inference mode refuses. Every variant runs alike."""
    kinds = layer_kinds(model) if kind_seconds is not None else None

    def run():
        by_kind = LayerKindTimer(model, kinds) if kinds else nullcontext()
        with torch.no_grad(), context_factory(), LanguageModelTimer(model) as timer, by_kind:
            model(**inputs, logits_to_keep=1)
        decoder_seconds.append(sum(timer.seconds))
        if kinds:
            kind_seconds.append(dict(by_kind.seconds))

    return run


def ideal_prefill(model, ideal: IdealModel, decoder_seconds: list[float],
                  kind_seconds: list[dict] | None = None) -> Callable[[], None]:
    """The ideal's prefill: ``IdealModel.embeddings`` (the tower, the projector on the kept count),
    its decoder (timed into ``decoder_seconds``: layers and final norm, what ``LanguageModelTimer``
    times of a reduced forward; with ``kind_seconds``, its layers of each kind), and the LM head on
    the last position. The decoder writes a fresh cache where the model's own forward does (its text
    config's ``use_cache``, as every variant's ``model(**inputs)`` runs): the layers then store their
    keys and values (a recurrence its states) in both, as a ``generate`` prefill must."""
    kinds = layer_kinds(model) if kind_seconds is not None else None
    caches = getattr(ideal.language_model.config, "use_cache", True)

    def run():
        by_kind = LayerKindTimer(model, kinds) if kinds else nullcontext()
        with torch.no_grad():
            embeds = ideal.embeddings()
            cache = ideal.new_cache() if caches else None
            with by_kind:
                start = time.perf_counter()
                hidden = ideal.decode(embeds, cache=cache, last=1)
                decoder_seconds.append(time.perf_counter() - start)
            model.lm_head(hidden[:, -1:])
        if kinds:
            kind_seconds.append(dict(by_kind.seconds))

    return run


def text_tokens(inputs, visual_ids) -> int:
    """The first row's tokens that are neither visual nor padding."""
    ids = inputs["input_ids"][0]
    valid = inputs["attention_mask"][0].bool() if "attention_mask" in inputs else torch.ones_like(ids, dtype=torch.bool)
    return int((valid & ~torch.isin(ids, torch.tensor(sorted(visual_ids)))).sum())


def kind_costs(dims: DecoderDims, counts: list[int], full: list[int], text: int) -> dict:
    """Per kind of layer, the exact FLOPs and the cache bytes of a prefill whose layers see ``text``
    plus ``counts`` visual tokens, against ``full``: ``{"layer_kind_flops_ratio": {kind: ratio},
    "layer_kind_cache_ratio": {kind: ratio}}`` (linear-attention states do not shrink: 1.0)."""
    ratios = {}
    for key, cost in (("layer_kind_flops_ratio", layer_flops), ("layer_kind_cache_ratio", layer_cache_bytes)):
        totals: dict[str, list[int]] = {}
        for layer, (n, m) in enumerate(zip(counts, full)):
            total = totals.setdefault(dims.kind(layer), [0, 0])
            total[0] += cost(dims, layer, text + n)
            total[1] += cost(dims, layer, text + m)
        ratios[key] = {kind: reduced / unreduced for kind, (reduced, unreduced) in totals.items()}
    return ratios


def layer_kinds(model) -> tuple[str, ...]:
    """Each decoder layer's kind (``LayerScheme.kinds``: attention, and Qwen3.5's linear attention)."""
    from ..adapters import adapter_for

    return adapter_for(model).scheme.kinds


def outside_layers(lm_seconds: list[float], kind_seconds: list[dict]) -> list[float]:
    """Per round, the seconds the language model spent outside its decoder layers: a reduced
    forward's boundaries (scoring, gathers, masks), its exit; the ideal's masks and final norm."""
    return [total - sum(kinds.values()) for total, kinds in zip(lm_seconds, kind_seconds)]


def layer_split(lm_seconds: list[float], kind_seconds: list[dict]) -> dict:
    """The medians over rounds of the seconds in the decoder layers (``layers_s``) and outside them
    (``outside_layers_s``); nothing where the layers were not timed."""
    if not kind_seconds:
        return {}
    return {"layers_s": statistics.median(sum(k.values()) for k in kind_seconds),
            "outside_layers_s": statistics.median(outside_layers(lm_seconds, kind_seconds))}


def layer_time_terms(seconds: list[float], kinds: list[dict], ideal_seconds: list[float], ideal_kinds: list[dict]) -> dict:
    """Where a variant's language-model time differs from its ideal's, from the same rounds:
    ``layers_vs_ideal``, the median per-round ratio of the seconds in the decoder layers (the same
    layers on the same token counts), and ``runtime_work_vs_ideal``, the median per-round seconds
    the variant spent outside its layers beyond what the ideal spent outside its own, as a fraction
    of the ideal's language-model time. Both are read within a round, so they drift less than the
    whole ratio (``lm_vs_ideal``) between runs."""
    layers = [sum(k.values()) for k in kinds]
    ideal_layers = [sum(k.values()) for k in ideal_kinds]
    extra = [mine - theirs for mine, theirs in zip(outside_layers(seconds, kinds), outside_layers(ideal_seconds, ideal_kinds))]
    return {"layers_vs_ideal": statistics.median(a / b for a, b in zip(layers, ideal_layers)),
            "runtime_work_vs_ideal": statistics.median(e / t for e, t in zip(extra, ideal_seconds))}


def _kind_medians(rounds: list[dict]) -> dict[str, float]:
    return {kind: statistics.median(r[kind] for r in rounds) for kind in rounds[0]} if rounds else {}


def _kind_ratios(rounds: list[dict], others: list[dict]) -> dict[str, float]:
    """Per kind, the median of the per-round ratios of ``rounds`` to ``others`` (the same rounds)."""
    if not rounds or not others:
        return {}
    return {kind: statistics.median(r[kind] / o[kind] for r, o in zip(rounds, others)) for kind in rounds[0]}


def selection_costs(forward: list[float], ideal: list[float], unreduced: list[float]) -> dict:
    """What a method's choosing costs, from per-round seconds of its forward, of its ideal (the same
    per-layer counts chosen for free) and of the unreduced forward, all measured in the same rounds.

    - ``forward_vs_unreduced``, ``forward_vs_ideal``: medians of the per-round ratios;
    - ``selection_cost_s``: the median per-round ``forward - ideal`` (scoring, choosing, the
      library's bookkeeping: everything the reduction costs beyond its token counts);
    - ``saving_s``: the median per-round ``unreduced - ideal`` (what the token counts save);
    - ``cost_share_of_saving``: ``selection_cost_s / saving_s`` (``None`` when nothing is saved);
    - ``pays``: ``forward_vs_unreduced < 1``; **False** when the forward takes at least the unreduced
      one's time, i.e. the selection costs more than its tokens save; ``rounds_paid``: the rounds in
      which the forward was faster than the unreduced one.

    >>> row = selection_costs([6.0, 7.0, 8.0], [5.0, 5.0, 6.0], [10.0, 11.0, 12.0])
    >>> row["selection_cost_s"], row["saving_s"], row["cost_share_of_saving"], row["pays"], row["rounds_paid"]
    (2.0, 6.0, 0.3333333333333333, True, 3)
    """
    if not (len(forward) == len(ideal) == len(unreduced)) or not forward:
        raise ValueError("forward, ideal and unreduced need one time per round each, from the same rounds")
    cost = statistics.median(f - i for f, i in zip(forward, ideal))
    saving = statistics.median(u - i for u, i in zip(unreduced, ideal))
    ratio = statistics.median(f / u for f, u in zip(forward, unreduced))
    return {
        "forward_vs_unreduced": ratio,
        "forward_vs_ideal": statistics.median(f / i for f, i in zip(forward, ideal)),
        "selection_cost_s": cost,
        "saving_s": saving,
        "cost_share_of_saving": cost / saving if saving > 0 else None,
        "pays": ratio < 1,
        "rounds_paid": sum(f < u for f, u in zip(forward, unreduced)),
    }


def _visual_per_layer(stats) -> list[int]:
    """Visual tokens entering each decoder layer, summed over the prompt's items (what the ideal keeps)."""
    return [sum(item.tokens_per_layer[layer] for item in stats.items) for layer in range(len(stats.tokens_per_layer))]


def schedule_name(counts) -> str:
    """Per-layer counts in a few characters: ``576 x2, 192 x30`` (count x layers, in order).

    >>> schedule_name([576, 576, 192, 192, 192])
    '576 x2, 192 x3'
    """
    return ", ".join(f"{count} x{len(list(run))}" for count, run in groupby(counts))


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def measure(model, inputs, reducers: dict, rounds: int, progress=None) -> dict:
    """Every reducer's prefill against the unreduced one and against its ideal, timed in the same
    interleaved rounds; ``reducers`` maps a variant's name to a reducer, or to the exception making
    one raised. The shared core of ``prefill_benchmark`` and ``family_benchmark``.

    Each variant runs once first (the warm-up): that run gives its per-layer counts, its selection's
    shapes and its projector rows, or the reason it cannot run on this geometry (then it is left out
    of the rounds and its row says why). One ideal is timed per distinct per-layer schedule, plus the
    ideal of no reduction (the direct layer loop against ``model.forward``: what the ideal's own
    path saves with nothing reduced).

    A variant and its ideal swap places every other round (``pairs_swapped``; an odd ``rounds``
    runs one more) and every median and ratio below is read per pair of rounds (``round_pairs``), in
    which each ran once first: in a fixed order the one timed first follows another group's forward
    in every round (what that costs: ``timing.pairs_swapped``). The per-round
    seconds (``forward_rounds_s``) and ``rounds_paid`` stay per round. Returns ``{"variants":
    {name: row}, "ideals": {name: row}, "rounds": rounds run, "load_average_before_after": ...}``.
    """
    rounds = paired_rounds(rounds)
    config = model.config
    visual_ids = {getattr(config, key) for key in ("image_token_id", "video_token_id")
                  if getattr(config, key, None) is not None}
    dims, per_row = Widths.of(model), projector_flops_per_row(projector_of(model))
    variants: dict[str, Callable[[], None]] = {}
    seconds: dict[str, list[float]] = {}
    by_kind: dict[str, list[dict]] = {}  # per variant, per round, seconds in each kind of layer
    hybrid = len(set(layer_kinds(model))) > 1
    facts: dict[str, dict] = {}

    def warm(name: str, run: Callable[[], None]) -> int:
        with _ProjectorRows(model) as rows:
            run()
        variants[name] = run
        return rows.count

    for name, reducer in {FULL: None, **reducers}.items():
        seconds[name], by_kind[name] = [], []
        if isinstance(reducer, Exception):
            facts[name] = {"error": _reason(reducer)}
            continue
        context = nullcontext if reducer is None else (lambda r=reducer: r(model))
        try:
            rows = warm(name, timed_prefill(model, inputs, context, seconds[name], by_kind[name]))
        except Exception as error:  # a method that cannot run on this geometry: the table says why
            variants.pop(name, None)
            facts[name] = {"error": _reason(error)}
            continue
        if reducer is None:
            ids = inputs["input_ids"]
            visual = torch.isin(ids, torch.tensor(sorted(visual_ids)))
            valid = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(visual)
            layers = config.text_config.num_hidden_layers
            decoder = DecoderDims.from_config(config.text_config)
            flops = sum(exact_flops(decoder, [int(row.sum())] * layers) for row in valid)  # each row, all its tokens
            facts[name] = {"counts": [int(visual[0].sum())] * layers, "projector_rows": rows, "decoder_flops": flops}
            continue
        stats = reducer.stats
        spec = reducer.build(1) if isinstance(reducer, PerItemRatio) else reducer  # the method's own options
        flops, terms = declared_flops(spec.method_name, spec, item_shapes(stats, inputs, visual_ids), dims)
        facts[name] = {"counts": _visual_per_layer(stats), "projector_rows": rows, "stats": stats,
                       "selection_flops": flops, "selection_flops_terms": terms}

    ideals: dict[tuple[int, ...], str] = {}
    for name, fact in facts.items():
        if "counts" in fact:
            key = tuple(fact["counts"])
            ideals.setdefault(key, "ideal: " + schedule_name(key))
            fact["ideal"] = ideals[key]
    ideal_rows: dict[str, dict] = {}
    for key, name in ideals.items():
        seconds[name], by_kind[name] = [], []
        ideal = IdealModel(model, inputs, list(key))
        rows = warm(name, ideal_prefill(model, ideal, seconds[name], by_kind[name]))
        ideal_rows[name] = {"visual_tokens_per_layer": list(key), "projector_rows": rows}
    # The pre-runs were the warm-up; only the rounds are timed.
    for name in seconds:
        seconds[name].clear()
        by_kind[name].clear()
    # Each ideal right after the first variant it serves: a drift of the load within a round then
    # hits a variant and its ideal alike; the two swap places every other round (``pairs_swapped``).
    groups: list[list[str]] = []
    placed: set[str] = set()
    for name, fact in facts.items():
        if name in variants:
            groups.append([name] + ([] if fact["ideal"] in placed else [fact["ideal"]]))
            placed.update(groups[-1])

    load_before = os.getloadavg()
    raw = interleaved(variants, rounds, warmup=0, progress=progress, order=pairs_swapped(groups))
    load_after = os.getloadavg()
    times = {name: round_pairs(values) for name, values in raw.items()}
    seconds = {name: round_pairs(values) for name, values in seconds.items()}
    by_kind = {name: round_pairs(values) for name, values in by_kind.items()}

    full = times[FULL]
    results = {}
    for name, fact in facts.items():
        if "error" in fact:
            results[name] = {"error": fact["error"]}
            continue
        ideal = fact["ideal"]
        stats = fact.get("stats")
        counts = fact["counts"]
        row = {
            "visual_tokens_per_layer": counts,
            "avg_visual_tokens": sum(counts) / len(counts),
            "forward_s": statistics.median(times[name]),
            "language_model_s": statistics.median(seconds[name]),
            "lm_vs_full": statistics.median(t / b for t, b in zip(seconds[name], seconds[FULL])),
            "flops_ratio": stats.flops_ratio if stats else 1.0,
            "kv_ratio": stats.kv_bytes / stats.kv_bytes_full if stats else 1.0,
            "decoder_flops": stats.flops_exact if stats else fact["decoder_flops"],
            "decoder_flops_full": stats.flops_exact_full if stats else fact["decoder_flops"],
            "projector_rows": fact["projector_rows"],
            "forward_rounds_s": raw[name],
        }
        row.update(layer_split(seconds[name], by_kind[name]))
        if hybrid and by_kind[name]:  # each kind of layer's part, and against no reduction
            row["layer_kind_s"] = _kind_medians(by_kind[name])
            row["layer_kind_vs_full"] = _kind_ratios(by_kind[name], by_kind[FULL])
            row.update(kind_costs(DecoderDims.from_config(config.text_config), counts, facts[FULL]["counts"],
                                  text_tokens(inputs, visual_ids)))
        if stats is not None:
            ideal_rows[ideal].setdefault("for", []).append(name)
            row["ideal"] = ideal
            row["ideal_forward_s"] = statistics.median(times[ideal])
            row["ideal_language_model_s"] = statistics.median(seconds[ideal])
            row["lm_vs_ideal"] = statistics.median(t / i for t, i in zip(seconds[name], seconds[ideal]))
            if by_kind[name] and by_kind[ideal]:
                row.update(layer_time_terms(seconds[name], by_kind[name], seconds[ideal], by_kind[ideal]))
            if hybrid and by_kind[name]:
                row["layer_kind_vs_ideal"] = _kind_ratios(by_kind[name], by_kind[ideal])
            row.update(selection_costs(times[name], times[ideal], full))
            row["rounds_paid"] = sum(f < u for f, u in zip(raw[name], raw[FULL]))
            extra = fact["projector_rows"] - ideal_rows[ideal]["projector_rows"]
            row.update(selection_flops=fact["selection_flops"], selection_flops_terms=fact["selection_flops_terms"],
                       projector_extra_rows=extra, projector_extra_flops=extra * per_row)
        results[name] = row
    for name, row in ideal_rows.items():
        row.update(forward_s=statistics.median(times[name]), language_model_s=statistics.median(seconds[name]),
                   forward_vs_unreduced=statistics.median(t / b for t, b in zip(times[name], full)),
                   forward_rounds_s=raw[name])
        row.update(layer_split(seconds[name], by_kind[name]))
        if hybrid and by_kind[name]:
            row["layer_kind_s"] = _kind_medians(by_kind[name])
    return {"variants": results, "ideals": ideal_rows, "rounds": rounds,
            "order": "pairs swapped every other round, read per pair of rounds",
            "load_average_before_after": [load_before, load_after], "cpus": os.cpu_count(),
            "processor": processor()}


def _reducers(methods: list[str], settings: list, key: str, label: Callable) -> dict:
    """``make(method, key=setting)`` for each pair, or the error making it raised."""
    reducers = {}
    for method in methods:
        for setting in settings:
            try:
                reducers[label(method, setting)] = make(method, **{key: setting})
            except Exception as error:
                reducers[label(method, setting)] = error
    return reducers


def prefill_benchmark(size: ModelSize, methods: list[str], budgets: list[int], rounds: int, text_tokens: int = 60,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Stage A's vision-side cost (``vision_variants`` at the first budget) and the prefill of each
    method and budget against the unreduced model and against its ideal (``measure``), each part in
    its own interleaved rounds; ``progress(phase)`` after every round.

    Returns ``{"vision": {variant: {median_s, ratio}}, "prefill": {variant: row}, "ideals": {...},
    ...}``; a row has ``forward_median_s, forward_ratio, language_model_median_s,
    language_model_ratio, flops_ratio, kv_ratio, avg_visual_tokens`` (ratios to no reduction:
    medians of the ratios per pair of rounds), the costs of ``selection_costs``, ``selection_flops``
    (where the method declares a count, ``selection``) and ``projector_extra_flops``, or ``error``
    when the method cannot run on this geometry.
    """
    rounds = paired_rounds(rounds)  # the prefill's rounds run in pairs (``measure``); the vision side's as many
    model = build_model(size)
    inputs = example_inputs(model, text_tokens=text_tokens)
    advance = (lambda phase: (lambda: progress(phase))) if progress else (lambda phase: None)
    vision = vision_variants(model, inputs, budgets[0])
    vision_times = interleaved(vision, rounds, progress=advance("vision side"))
    reducers = _reducers(methods, budgets, "budget", lambda method, budget: f"{method} {budget}")
    measured = measure(model, inputs, reducers, rounds, progress=advance("prefill"))

    results = {"model": vars(size), "rounds": rounds, "threads": torch.get_num_threads(), "text_tokens": text_tokens,
               "vision": {}, "prefill": {}}
    ratios = median_ratio(vision_times, FULL)
    for name, values in vision_times.items():
        results["vision"][name] = {"median_s": statistics.median(values), "ratio": ratios[name]}
    for name, row in measured["variants"].items():
        if "error" not in row:  # the names the renderers have always read
            row = {"forward_median_s": row["forward_s"], "forward_ratio": row.get("forward_vs_unreduced", 1.0),
                   "language_model_median_s": row["language_model_s"], "language_model_ratio": row["lm_vs_full"], **row}
        results["prefill"][name] = row
    results.update(ideals=measured["ideals"], load_average_before_after=measured["load_average_before_after"],
                   cpus=measured["cpus"], processor=measured["processor"], order=measured["order"])
    return results


def family_benchmark(family: str, size: ModelSize, methods: list[str], ratios: list[float], rounds: int, progress=None) -> dict:
    """Prefill of ``family``'s typical prompt (``build_family``: any of ``FAMILIES``) under each
    method and ratio, side by side with the unreduced model and, for each reduced variant, its ideal
    (``measure``: the tower, the kept tokens and the unpatched decoder on the same per-layer counts;
    M-RoPE families keep their kept tokens' positions, hybrid decoders give each layer its kind's mask,
    Gemma 3 its own masks of the kept sequence), and, for a family that builds its own masks, the
    median cost of one build (``mask_rebuild_s``).

    Returns ``{"variants": {variant: {forward_s, language_model_s, ideal_s, lm_vs_ideal, lm_vs_full,
    flops_ratio, kv_ratio, avg_visual_tokens, ...the costs of selection_costs...}}, "ideals": ...}``
    (medians over pairs of interleaved rounds, ratios read per pair: ``measure``); ``ideal_s`` is the
    ideal's language-model part, ``ideal_forward_s`` its whole forward; a variant that cannot run has
    ``error``.
    """
    model, inputs = build_family(family, size)
    reducers = _reducers(methods, ratios, "ratio", lambda method, ratio: f"{method} ratio {ratio:g}")
    measured = measure(model, inputs, reducers, rounds, progress=progress)
    variants = {}
    for name, row in measured["variants"].items():
        if "error" not in row:
            row = dict(row)
            if name == FULL:
                row["avg_visual_tokens"] = None  # "all": the renderers' mark of the unreduced row
            else:
                row["ideal_s"] = row["ideal_language_model_s"]
        variants[name] = row
    return {"family": family, "model": vars(size), "rounds": measured["rounds"], "order": measured["order"],
            "threads": torch.get_num_threads(),
            "variants": variants, "ideals": measured["ideals"], "mask_rebuild_s": mask_rebuild_s(model, inputs, rounds),
            "load_average_before_after": measured["load_average_before_after"], "cpus": measured["cpus"],
            "processor": measured["processor"]}


def mask_rebuild_s(model, inputs: dict, rounds: int) -> float | None:
    """Median seconds of one build of the family's own layer masks over the whole prompt, for a
    family whose base model builds them (Gemma 3: bidirectional image blocks and sliding windows,
    ``FamilyMasks.build``): what the runtime pays at the entry and at each boundary, on at
    most this many tokens. ``None`` where the language model builds its causal masks itself."""
    from ..adapters import adapter_for
    from ..adapters.scheme import FamilyMasks

    scheme = adapter_for(model).scheme
    if not isinstance(scheme, FamilyMasks):
        return None
    ids = inputs["input_ids"]
    with torch.no_grad():
        hidden = model.get_input_embeddings()(ids)
        valid, types = inputs["attention_mask"].bool(), scheme.token_types(ids, inputs, [])
        seconds = []
        for _ in range(rounds):
            start = time.perf_counter()
            scheme.build(hidden, valid, types)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


COST_COLUMNS = ("variant", "visual tok/layer", "forward s", "vs unreduced", "vs ideal", "selection cost s",
                "cost / saving", "selection GFLOPs", "extra projector GFLOPs", "decoder GFLOPs", "pays?")


def _number(value, digits: int, scale: float = 1.0) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def cost_cells(name: str, row: dict, rounds: int) -> list[str]:
    """One variant of ``measure`` (``prefill_benchmark``'s ``prefill`` or ``family_benchmark``'s
    ``variants``) as the cells of ``COST_COLUMNS``: medians in seconds, ratios, the selection's cost
    and its share of the saving (``selection_costs``), GFLOPs (selection: declared counts, ``—``
    where a method declares none; extra projector: rows beyond the ideal's; decoder: exact), and
    whether it pays, with the rounds in which it did."""
    if "error" in row:
        return [name, f"cannot run: {row['error']}"] + [""] * (len(COST_COLUMNS) - 2)
    tokens = row["avg_visual_tokens"]
    cells = [name, "all" if tokens is None or "ideal" not in row else f"{tokens:.1f}", f"{row['forward_s']:.2f}"]
    if "ideal" not in row:  # the unreduced model
        return cells + ["1.000", "", "", "", "", "", _number(row["decoder_flops_full"], 1, 1e-9), ""]
    paid = f"{'yes' if row['pays'] else '**no**'} ({row['rounds_paid']}/{rounds})"
    return cells + [
        f"{row['forward_vs_unreduced']:.3f}", f"{row['forward_vs_ideal']:.3f}", f"{row['selection_cost_s']:.2f}",
        _number(row["cost_share_of_saving"], 2), _number(row["selection_flops"], 2, 1e-9),
        _number(row["projector_extra_flops"], 2, 1e-9), _number(row["decoder_flops"], 1, 1e-9), paid,
    ]


def ideal_of_no_reduction(ideals: dict, unreduced: dict) -> dict | None:
    """Of ``measure``'s ideals, the one on the unreduced row's own counts: the ideal's direct layer
    loop against the model's forward with nothing reduced (``None`` in files written without it)."""
    counts = unreduced.get("visual_tokens_per_layer")
    return next((ideal for ideal in ideals.values() if ideal["visual_tokens_per_layer"] == counts), None)


def costs_markdown(variants: dict, ideals: dict, rounds: int) -> str:
    """``measure``'s variants as one markdown table (``cost_cells``), the ideal of no reduction second:
    how far the ideal's direct layer loop is from the model's own forward with nothing reduced."""
    lines = ["| " + " | ".join(COST_COLUMNS) + " |", "|" + "---|" * len(COST_COLUMNS)]
    for name, row in variants.items():
        lines.append("| " + " | ".join(cost_cells(name, row, rounds)) + " |")
        if "ideal" not in row and "error" not in row:
            calibration = ideal_of_no_reduction(ideals, row)
            if calibration is not None:
                cells = ["ideal of no reduction", "all", f"{calibration['forward_s']:.2f}",
                         f"{calibration['forward_vs_unreduced']:.3f}"] + [""] * (len(COST_COLUMNS) - 4)
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
