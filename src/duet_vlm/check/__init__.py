"""``duet-vlm check``: the library's invariants, run on the user's own checkpoint, device, dtype and
attention backend.

The test suite proves each invariant on tiny models of the real classes on a CPU; users run 7B-72B
checkpoints in bfloat16 under FlashAttention-2 or SDPA on a GPU. ``check_model`` runs the same
invariants on whatever model it is given, with a handful of inputs (a left-padded batch of two
prompts of different lengths, and each row alone), and reports each as pass, fail or not
applicable, with the numbers:

- ``model``: the family, the adapter, the attention backend in use, and the plan solved for each item;
- ``full``: ``make("full")`` attached equals the model without a reducer (bit for bit on a CPU;
  within the dtype's tolerance elsewhere);
- ``restored``: after the method ran and was removed, the hooks are the ones before, no weight
  moved, and the logits are bit-identical to the unpatched model's;
- ``padded``: under the method, a left-padded batch equals each row alone (logits at every valid
  position, greedy tokens);
- ``counts``: the visual tokens entering each decoder layer equal the statistics and the plan, and
  each layer's KV cache holds its prefill plus the generated tokens;
- ``ideal``: the reduced prefill equals its ideal, the unpatched decoder layers fed the kept tokens
  (``replay``), at every token that reaches the last layer;
- ``mode:*``: the generation modes of the modes table that a check can run quickly (uncached
  decoding, beam search, sampling, threads, a static cache, prompt lookup, hidden states), each
  against what the table says (``equal``, ``refused``, ``warns``);
- ``timing``: prefill and generate seconds, interleaved, against no reduction and against the ideal
  (``bench.ideal.IdealModel``, where it covers the family), with the exact decoder FLOPs, KV bytes
  and peak device memory beside them.

``check_checkpoint`` loads a checkpoint (path or Hub id) with a device, dtype and attention backend
and builds the inputs with its processor (images it draws, or the user's).
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import compat
from ..adapters import adapter_for
from ..methods import make
from ..methods.registry import default_budget
from ..plan import ReducedHiddenStatesWarning
from .replay import EntryProbe, NotReplayable, Replay
from .report import FAIL, INFO, NOT_APPLICABLE, PASS, Report, Result, versions

#: Largest difference of logits (relative to the reference's largest magnitude, at least 1) that
#: counts as equal, per dtype, where two computations differ in shapes (a padded batch against its
#: rows, the reduced model against its ideal). ``full`` and ``restored`` are bit-identical on a CPU.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}
#: In half precision a padded batch and its rows differ by the dtype's rounding even without a reducer
#: (the unpatched Gemma 3 tiny model: 0.032 in bfloat16), and a reduced run rounds differently again:
#: shorter shapes, SparseVLM's recycled tokens averaged (on the tiny models, with the same tokens
#: chosen in the batch and alone: up to 6.4x the unpatched difference, bfloat16 and float16). The
#: padded check allows this many times the unpatched model's own difference where that exceeds the
#: tolerance; a row reading its neighbour's tokens moves logits by their own size, far above both.
PADDING_NOISE = 8.0

__all__ = ["CHECKS", "TOLERANCE", "LayerLengths", "Report", "Result", "check_checkpoint", "check_model", "hook_ids"]


@dataclass
class Context:
    """What every check reads: the model, its inputs, and how to build the method's reducer."""

    model: torch.nn.Module
    batch: dict
    rows: list[dict]
    reducer: Callable[[], object]
    new_tokens: int

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tolerance(self) -> float:
        return TOLERANCE.get(self.dtype, 3e-2)

    @property
    def exact(self) -> bool:
        """A CPU runs every kernel the same way twice: there, unchanged computations are bit-identical."""
        return self.device.type == "cpu"

    def logits(self, inputs: dict, reducer=None) -> torch.Tensor:
        with torch.no_grad(), (reducer(self.model) if reducer is not None else contextlib.nullcontext()):
            return self.model(**inputs).logits

    def generate(self, inputs: dict, reducer=None, **kwargs):
        options = dict(max_new_tokens=self.new_tokens, do_sample=False)
        options.update(kwargs)
        with torch.no_grad(), (reducer(self.model) if reducer is not None else contextlib.nullcontext()):
            return self.model.generate(**inputs, **options)


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, relative to ``b``'s largest magnitude when that exceeds 1."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0)) if b.numel() else 0.0


def hook_ids(model) -> dict:
    """Every hook on every module, by id: equal before attaching a reducer and after removing it."""
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {(name, kind): tuple(getattr(module, kind)) for name, module in model.named_modules()
            for kind in kinds if getattr(module, kind)}


def _weights(model) -> dict:
    """Each parameter's and buffer's storage, its in-place write counter, and a float64 sum of a
    strided sample of it (a write through ``.data`` bumps no counter): no copy of the weights."""

    def sample_sum(tensor: torch.Tensor) -> float:
        flat = tensor.detach().reshape(-1)
        return float(flat[:: max(1, flat.numel() // 65536)].double().sum())

    with torch.no_grad():
        return {name: (tensor.data_ptr(), tuple(tensor.shape), tensor._version, sample_sum(tensor))
                for name, tensor in [*model.named_parameters(), *model.named_buffers()]}


# ----------------------------------------------------------------------------- checks
def _run_rows(ctx: Context, method: str) -> list:
    """Each row alone under a fresh reducer: its items' statistics (each with the geometry its plan
    was solved for). A budget the method cannot meet on some item is the user's to change: refused."""
    found = []
    for b, row in enumerate(ctx.rows):
        reducer = ctx.reducer()
        try:
            ctx.logits(row, reducer)
        except ValueError as error:
            raise ValueError(f"{method} cannot run on row {b} of the check's inputs: {error}") from error
        found.append(reducer.stats.items)
    return found


def check_setup(ctx: Context, method: str) -> tuple[dict, Result]:
    """The family, adapter, backend and the plan solved for each item of the first row."""
    model = ctx.model
    adapter = adapter_for(model)
    reducer = ctx.reducer()
    items = _run_rows(ctx, method)[0]
    plans = [f"{item.tokens} -> {_runs(reducer.resolve(item.geometry, quiet=True).schedule.tokens_per_layer)}"
             for item in items]
    setup = {
        "family": getattr(model.config, "model_type", type(model).__name__), "class": type(model).__name__,
        "adapter": type(adapter).__name__, "attention": model.config._attn_implementation,
        "vision_attention": getattr(getattr(model.config, "vision_config", None), "_attn_implementation", None),
        "dtype": str(ctx.dtype).removeprefix("torch."), "device": str(ctx.device), "method": method,
        "reducer": reducer.to_dict(), "decoder_layers": adapter.num_layers(), "plan": plans,
        "rows": [int(row["input_ids"].shape[1]) for row in ctx.rows],
    }
    detail = f"{setup['family']} ({setup['adapter']}), {setup['attention']}, {setup['dtype']} on {setup['device']}"
    return setup, Result("model", "model, backend and plan", INFO, detail + "; plan: " + "; ".join(plans))


def check_full(ctx: Context, plain: torch.Tensor) -> Result:
    """``make("full")`` attached changes nothing."""
    logits = ctx.logits(ctx.batch, make("full"))
    difference = _difference(logits, plain)
    bound = 0.0 if ctx.exact else ctx.tolerance
    ok = torch.equal(logits, plain) or difference <= bound
    numbers = {"max_difference": difference, "bit_identical": bool(torch.equal(logits, plain)), "tolerance": bound}
    return Result("full", "full equals the unpatched model", PASS if ok else FAIL,
                  "bit-identical" if numbers["bit_identical"] else f"max difference {difference:.3g} (allowed {bound:.3g})",
                  numbers)


def check_restored(ctx: Context) -> Result:
    """After the method ran (a forward and a generate) and was removed, the hooks are the ones
    before, no weight moved, and the logits are bit-identical to the unpatched model's.

    transformers installs hooks of its own at a model's first forward (and its first call that
    asks for hidden states): the unpatched model makes those calls first, so the hooks compared are
    only those the reducer could leave."""
    model, inputs = ctx.model, ctx.batch
    plain = ctx.logits(inputs)
    ctx.generate(inputs, output_hidden_states=True, return_dict_in_generate=True)
    hooks, weights = hook_ids(model), _weights(model)
    reducer = ctx.reducer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reduced hidden states' warning: the modes check reports it
        ctx.logits(inputs, reducer)
        ctx.generate(inputs, reducer, output_hidden_states=True, return_dict_in_generate=True)
    problems = []
    left = set(hook_ids(model).items()) ^ set(hooks.items())
    if left:
        problems.append(f"hooks left behind on {', '.join(sorted({name for (name, _), _ in left})[:3])}")
    now = _weights(model)
    moved = sorted(name for name in set(now) | set(weights) if now.get(name) != weights.get(name))
    if moved:
        problems.append(f"weights changed: {', '.join(moved[:3])}")
    logits = ctx.logits(inputs)
    difference = _difference(logits, plain)
    same = torch.equal(logits, plain) or (not ctx.exact and difference <= ctx.tolerance)
    if not same:
        problems.append(f"logits differ from the unpatched model's by {difference:.3g}")
    return Result("restored", "model restored after the run", FAIL if problems else PASS,
                  "; ".join(problems) or "hooks, weights and logits as before",
                  {"max_difference": difference, "tensors_checked": len(weights)})


def _selections(reducer) -> dict[int, list[set]]:
    """Per batch row, the token sets the last prefill chose: each item's vision-side picks (per
    unit) and the tokens that survive each pruning boundary that dropped some of them (a batch
    stops every row at a boundary any of its items has)."""
    chosen: dict[int, list[set]] = {}
    for item in reducer.stats.items:
        sets = chosen.setdefault(item.row, [])
        if item.vision_kept is not None:
            sets += [set(unit.tolist()) - {-1} for unit in item.vision_kept]
        entering = item.tokens_per_layer[0] if item.tokens_per_layer else None
        for _, ids in item.stage_ids:  # a boundary that dropped nothing of this item chose nothing
            if len(ids) != entering:
                sets.append(set(ids.tolist()))
            entering = len(ids)
    return chosen


def _swapped(batch: list[set], alone: list[set]) -> tuple[int, int]:
    """How many chosen tokens differ between a row's selections in the batch and alone, of how many
    (every one, where the two made different numbers of selections)."""
    chosen = sum(len(b) for b in alone)
    if len(batch) != len(alone):
        return max(chosen, 1), chosen
    return sum(len(a - b) for a, b in zip(batch, alone)), chosen


def _padding_difference(ctx: Context, reducer=None):
    """The largest difference between the batch's logits at every valid position and each row's
    alone, over the rows whose selections agree; and, per row, the selections' differences."""
    logits = ctx.logits(ctx.batch, reducer)
    in_batch = _selections(reducer) if reducer is not None else {}
    worst, problems, swaps = 0.0, [], {}
    for b, alone in enumerate(ctx.rows):
        valid = ctx.batch["attention_mask"][b].bool() if "attention_mask" in ctx.batch else slice(None)
        own = ctx.logits(alone, reducer)[0]
        if logits[b, valid].shape != own.shape:
            problems.append(f"row {b}: {tuple(logits[b, valid].shape)} valid logits against {tuple(own.shape)} alone")
            continue
        if reducer is not None:
            swaps[b] = _swapped(in_batch.get(b, []), _selections(reducer).get(0, []))
            if swaps[b][0]:
                continue  # other tokens kept: the logits are not comparable
        worst = max(worst, _difference(logits[b, valid], own))
    return worst, problems, swaps


def check_padded(ctx: Context) -> Result:
    """A left-padded batch under the method equals each row alone: the same tokens chosen, the logits
    within the dtype's tolerance (or ``PADDING_NOISE`` times what the unpatched model's own batch
    differs from its rows, if more), and the same greedy tokens (in half precision, parting on a
    near-tie of the next token's logits is said, not failed). Chosen tokens must agree: in half
    precision a batch can round a near-tie of the scores apart from the row alone, which the report
    names; only float32 tells that from a fault, so the message says so."""
    reducer = ctx.reducer()
    worst, problems, swaps = _padding_difference(ctx, reducer)
    noise = _padding_difference(ctx)[0]
    allowed = max(ctx.tolerance, PADDING_NOISE * noise)
    half = ctx.dtype in (torch.float16, torch.bfloat16)
    notes = []
    for b, (different, chosen) in sorted(swaps.items()):
        if different:
            hint = (f" (in {str(ctx.dtype).removeprefix('torch.')} a near-tie of the scores can round apart: "
                    "float32 tells it from a fault)") if half else ""
            problems.append(f"row {b}: {different} of {chosen} chosen tokens differ in the batch{hint}")
    batch = ctx.generate(ctx.batch, reducer, output_logits=True, return_dict_in_generate=True)
    tokens = batch.sequences[:, ctx.batch["input_ids"].shape[1]:]
    for b, alone in enumerate(ctx.rows):
        if swaps.get(b, (0, 0))[0]:
            continue
        own = ctx.generate(alone, reducer, output_logits=True, return_dict_in_generate=True)
        single = own.sequences[0, alone["input_ids"].shape[1]:]
        split = next((t for t in range(len(single)) if tokens[b, t] != single[t]), None)
        if split is None:
            continue
        mine, theirs = batch.logits[split][b].float(), own.logits[split][0].float()
        margin = allowed * float(theirs.abs().max().clamp(min=1.0))
        if half and theirs.max() - theirs[tokens[b, split]] <= margin and mine.max() - mine[single[split]] <= margin:
            notes.append(f"row {b}: greedy tokens part at step {split} on a near-tie")
            continue
        problems.append(f"row {b}: greedy tokens {tokens[b, :len(single)].tolist()} in the batch, {single.tolist()} alone")
    if worst > allowed:
        problems.insert(0, f"max logit difference {worst:.3g} (allowed {allowed:.3g}; unpatched {noise:.3g})")
    said = "; ".join(notes) if notes else "same tokens"
    detail = "; ".join(problems) or f"max difference {worst:.3g} (unpatched {noise:.3g}), {said}"
    return Result("padded", "padded batch equals rows alone", FAIL if problems else PASS, detail,
                  {"max_difference": worst, "tolerance": allowed, "unpatched_difference": noise,
                   "rows": len(ctx.rows), "swapped": {b: list(s) for b, s in swaps.items()}})


class LayerLengths:
    """The sequence length entering each decoder layer, per call (hooks registered after the reducer's)."""

    def __init__(self, model):
        self.calls: list[dict[int, int]] = []
        layers = model.model.language_model.layers

        def hook(index):
            def record(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if index == 0:
                    self.calls.append({})
                self.calls[-1][index] = hidden.shape[1]
            return record

        self.handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def check_counts(ctx: Context) -> Result:
    """Per layer: visual tokens entering it = the statistics = the plan; its KV cache = its prefill
    plus the generated tokens (attention layers; a sliding window holds its window)."""
    model, inputs = ctx.model, ctx.rows[0]
    adapter = adapter_for(model)
    reducer = ctx.reducer()
    problems = []
    with reducer(model):
        lengths = LayerLengths(model)
        try:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=ctx.new_tokens, do_sample=False, return_dict_in_generate=True)
        finally:
            lengths.remove()
    stats = reducer.stats.items
    text = inputs["input_ids"].shape[1] - sum(item.tokens for item in stats)
    planned = [
        (reducer if item.budget is None else reducer.with_budget(item.budget)).resolve(item.geometry, quiet=True)
        .schedule.tokens_per_layer for item in stats
    ]
    for index, (item_stats, plan) in enumerate(zip(stats, planned)):
        if item_stats.tokens_per_layer != plan:
            problems.append(f"item {index}: statistics {_runs(item_stats.tokens_per_layer)}, plan {_runs(plan)}")
    seen = sorted(lengths.calls[0].items())
    cut = adapter.scheme.queries_cut_from
    if cut is not None:  # Gemma 4's KV-shared layers see the prompt's last token only (transformers 5.23+)
        seen = seen[:cut]
    visual = [length - text for _, length in seen]
    expected = [sum(p[layer] for p in planned) for layer in range(len(visual))]
    if visual != expected:
        problems.append(f"layers received {_runs(visual)} visual tokens, the plan says {_runs(expected)}")
    generated = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    checked = 0
    reusing = {i for i, mode in enumerate(compat.kv_sharing_modes(adapter.text_config)) if mode == "reuse"}
    for layer, count in enumerate(visual):
        if layer in reusing:
            continue  # Gemma 4's KV-shared layers read an earlier layer's keys and values and cache none
        cached = out.past_key_values.layers[layer]
        if hasattr(cached, "recurrent_states") or getattr(cached, "keys", None) is None:
            continue  # linear attention: a state of fixed size
        held = text + count + generated - 1
        if getattr(cached, "is_sliding", False):
            held = min(held, cached.sliding_window - 1)
        checked += 1
        if cached.keys.shape[-2] != held:
            problems.append(f"layer {layer}: KV cache holds {cached.keys.shape[-2]} tokens, expected {held}")
    return Result("counts", "per-layer tokens and KV cache equal the plan", FAIL if problems else PASS,
                  "; ".join(problems[:4]) or f"{len(visual)} layers, {checked} KV caches as planned ({_runs(visual)})",
                  {"visual_per_layer": visual, "planned": expected, "kv_layers_checked": checked})


def _runs(counts) -> str:
    return ", ".join(f"{c} x{len(list(r))}" for c, r in groupby(counts))


def check_ideal(ctx: Context) -> Result:
    """Each row alone: the reduced prefill's last-layer states at every token that reaches it equal
    the ideal's (``replay``), and so do the LM head's logits of them."""
    worst, compared = 0.0, 0
    for inputs in ctx.rows:
        reducer = ctx.reducer()
        with reducer(ctx.model):
            probe = EntryProbe(ctx.model)
            try:
                with torch.no_grad():
                    ctx.model(**inputs)
            finally:
                probe.remove()
        try:
            replay = Replay(ctx.model, reducer, inputs, probe)
        except NotReplayable as reason:
            return Result("ideal", "reduced prefill equals the ideal", NOT_APPLICABLE, str(reason))
        ideal = replay.run()
        reduced = probe.last
        if ideal.shape != reduced.shape:
            return Result("ideal", "reduced prefill equals the ideal", FAIL,
                          f"the last layer returned {tuple(reduced.shape)}, the ideal {tuple(ideal.shape)}")
        language_model, head = ctx.model.model.language_model, ctx.model.lm_head
        with torch.no_grad():
            expected, got = head(language_model.norm(ideal)), head(language_model.norm(reduced))
        worst = max(worst, _difference(got, expected))
        compared += ideal.shape[1]
    status = PASS if worst <= ctx.tolerance else FAIL
    return Result("ideal", "reduced prefill equals the ideal", status,
                  f"max logit difference {worst:.3g} over {compared} positions (allowed {ctx.tolerance:.3g})",
                  {"max_difference": worst, "positions": compared, "tolerance": ctx.tolerance})


def _outcome(run: Callable[[], object]) -> tuple[str, object, str]:
    """``(equal-or-warns, value, warning text)`` of a call, or ``("refused", None, message)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = run()
        except (ValueError, NotImplementedError, RuntimeError, TypeError) as error:
            return "refused", None, str(error)
    said = [str(w.message) for w in caught if issubclass(w.category, ReducedHiddenStatesWarning)]
    return ("warns" if said else "ran"), value, "; ".join(said)


def check_modes(ctx: Context) -> list[Result]:
    """The generation modes a check can run in seconds, each against the modes table's cell for the
    method's kind (``generation_modes``)."""
    import re

    from ..generation_modes import cell, kind_of_plan

    inputs = ctx.rows[0]
    start = inputs["input_ids"].shape[1]
    reducer = ctx.reducer()
    greedy = ctx.generate(inputs, reducer)[0, start:].tolist()
    items = reducer.stats.items  # the greedy call's prefill: the kind of the plan solved for its first item
    kind = kind_of_plan(reducer.resolve(items[0].geometry, quiet=True)) if items else "full"
    # modes compared with greedy decoding (on the default dynamic cache), by the table
    runs = {
        "no_cache": lambda: ctx.generate(inputs, ctx.reducer(), use_cache=False)[0, start:].tolist(),
        "static_cache": lambda: ctx.generate(inputs, ctx.reducer(), cache_implementation="static")[0, start:].tolist(),
        "prompt_lookup": lambda: ctx.generate(inputs, ctx.reducer(), prompt_lookup_num_tokens=2)[0, start:].tolist(),
        "hidden_states": lambda: ctx.generate(inputs, ctx.reducer(), output_hidden_states=True,
                                              return_dict_in_generate=True).sequences[0, start:].tolist(),
    }
    references = {"no_cache": greedy, "static_cache": greedy, "prompt_lookup": greedy, "hidden_states": greedy}
    own = {"beam_search": _beams, "sampling": _sampling, "threads": _threads}  # modes with references of their own
    results = []
    for key in ("no_cache", "beam_search", "sampling", "threads", "static_cache", "prompt_lookup", "hidden_states"):
        if key in own:
            results.append(own[key](ctx, kind))
            continue
        run, expected, title = runs[key], cell(key, kind), f"mode: {key.replace('_', ' ')}"
        if key == "prompt_lookup":
            unpatched, _, why = _outcome(lambda: ctx.generate(inputs, prompt_lookup_num_tokens=2))
            if unpatched == "refused":
                results.append(Result(f"mode:{key}", title, NOT_APPLICABLE,
                                      f"the unpatched model fails it on this prompt too: {why[:100]}", {"kind": kind}))
                continue
        if key == "static_cache":
            plain = ctx.generate(inputs)[0, start:].tolist()
            fixed = ctx.generate(inputs, cache_implementation="static")[0, start:].tolist()
            if fixed != plain:  # transformers' own static path on this backend
                results.append(Result(f"mode:{key}", title, NOT_APPLICABLE,
                                      f"the unpatched model's static cache gives other tokens than its dynamic cache "
                                      f"here too ({fixed} against {plain})", {"kind": kind}))
                continue
        got, value, said = _outcome(run)
        if got == "refused" and expected.outcome != "refused" and re.search(r"needs transformers \S+ or newer", said):
            # what the table says holds from a newer release on; this one is refused by name (``compat``)
            results.append(Result(f"mode:{key}", title, NOT_APPLICABLE,
                                  f"refused on this transformers release: {said[:160]}", {"kind": kind}))
            continue
        if expected.outcome == "refused" and key == "prompt_lookup" and got == "ran" and value == references[key]:
            # refused only when drafts reach the prefill; none did on this prompt, and then it is greedy
            ok, detail = True, "no draft reached the prefill on this prompt: equal to greedy"
        elif expected.outcome == "refused":
            ok = got == "refused" and re.search(expected.says, said) is not None
            detail = "refused, as the table says" if ok else f"expected a refusal ({expected.says}), got: {got} {said[:80]}"
        elif expected.outcome == "warns":
            ok = got == "warns" and value == references[key]
            detail = "warns, tokens equal" if ok else f"expected a warning and equal tokens, got {got}: {said[:80]}"
        else:
            ok = got == "ran" and value == references[key]
            detail = "equal" if ok else (f"refused: {said[:100]}" if got == "refused" else f"tokens {value} against {references[key]}")
        results.append(Result(f"mode:{key}", title, PASS if ok else FAIL, detail, {"kind": kind, "expected": expected.outcome}))
    return results


def _beams(ctx: Context, kind: str) -> Result:
    """Beam search on the padded batch equals each row alone."""
    beams = dict(num_beams=2, early_stopping=True)
    batch = ctx.generate(ctx.batch, ctx.reducer(), **beams)[:, ctx.batch["input_ids"].shape[1]:]
    problems = []
    for b, alone in enumerate(ctx.rows):
        single = ctx.generate(alone, ctx.reducer(), **beams)[0, alone["input_ids"].shape[1]:].tolist()
        if batch[b, : len(single)].tolist() != single:
            problems.append(f"row {b}: {batch[b, :len(single)].tolist()} in the batch, {single} alone")
    return Result("mode:beam_search", "mode: beam search", FAIL if problems else PASS, "; ".join(problems) or "equal",
                  {"kind": kind, "expected": "equal", "beams": 2})


def _sampling(ctx: Context, kind: str) -> Result:
    """Two sampled sequences of one prompt equal the prompt repeated in a batch, with the same seed."""
    inputs = ctx.rows[0]
    start = inputs["input_ids"].shape[1]
    sample = dict(do_sample=True, top_k=0)
    torch.manual_seed(0)
    several = ctx.generate(inputs, ctx.reducer(), num_return_sequences=2, **sample)[:, start:]
    torch.manual_seed(0)
    repeated = ctx.generate({k: torch.cat([v, v]) for k, v in inputs.items()}, ctx.reducer(), **sample)[:, start:]
    same = torch.equal(several, repeated)
    return Result("mode:sampling", "mode: sampling", PASS if same else FAIL,
                  "equal" if same else f"{several.tolist()} sampled as two sequences, {repeated.tolist()} as two rows",
                  {"kind": kind, "expected": "equal"})


def _threads(ctx: Context, kind: str) -> Result:
    """Two threads generating the rows at once on one attached model equal the calls one by one."""
    from concurrent.futures import ThreadPoolExecutor

    model, reducer = ctx.model, ctx.reducer()
    options = dict(max_new_tokens=ctx.new_tokens, do_sample=False)
    with torch.no_grad(), reducer(model):
        alone = [model.generate(**row, **options).tolist() for row in ctx.rows]
        with ThreadPoolExecutor(len(ctx.rows)) as pool:
            together = list(pool.map(lambda row: model.generate(**row, **options).tolist(), ctx.rows))
    same = together == alone
    return Result("mode:threads", "mode: threads", PASS if same else FAIL,
                  "equal" if same else "threads sharing the model gave other tokens than the calls one by one",
                  {"kind": kind, "expected": "equal", "threads": len(ctx.rows)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(ctx: Context, run: Callable[[], object]) -> int | None:
    if ctx.device.type != "cuda":
        return None
    _sync(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    run()
    _sync(ctx.device)
    return int(torch.cuda.max_memory_allocated(ctx.device))


def check_timing(ctx: Context, rounds: int, progress=None) -> Result:
    """Prefill and generate seconds of one row, interleaved, against no reduction and the ideal; the
    decoder's exact FLOPs and KV bytes; peak device memory (CUDA)."""
    from ..bench.ideal import IdealModel
    from ..bench.timing import interleaved

    model, inputs, device = ctx.model, ctx.rows[0], ctx.device
    reducer = ctx.reducer()

    def timed(fn):
        def run():
            fn()
            _sync(device)
        return run

    prefill = {
        "unreduced": timed(lambda: ctx.logits(inputs)),
        "reduced": timed(lambda: ctx.logits(inputs, reducer)),
    }
    prefill["reduced"]()  # the statistics of this row
    stats = reducer.stats
    counts = [sum(item.tokens_per_layer[layer] for item in stats.items) for layer in range(len(stats.tokens_per_layer))]
    ideal_reason = None
    try:
        ideal = IdealModel(model, inputs, counts)

        def ideal_run():
            with torch.no_grad():
                model.lm_head(ideal.forward()[:, -1:])

        ideal_run()
        prefill["ideal"] = timed(ideal_run)
    except Exception as error:  # the bench's ideal covers LLaVA, Qwen3.5, InternVL and Gemma families
        ideal_reason = f"{type(error).__name__}: {error}"[:160]
    report = (lambda: progress("prefill")) if progress else None
    prefill_s = {name: statistics.median(times) for name, times in interleaved(prefill, rounds, warmup=1, progress=report).items()}
    generate = {
        "unreduced": timed(lambda: ctx.generate(inputs, min_new_tokens=ctx.new_tokens)),
        "reduced": timed(lambda: ctx.generate(inputs, reducer, min_new_tokens=ctx.new_tokens)),
    }
    report = (lambda: progress("generate")) if progress else None
    generate_s = {name: statistics.median(times) for name, times in interleaved(generate, rounds, warmup=1, progress=report).items()}
    numbers = {
        "rounds": rounds, "prefill_s": prefill_s, "generate_s": generate_s, "new_tokens": ctx.new_tokens,
        "prefill_vs_unreduced": prefill_s["reduced"] / prefill_s["unreduced"],
        "generate_vs_unreduced": generate_s["reduced"] / generate_s["unreduced"],
        "prefill_vs_ideal": prefill_s["reduced"] / prefill_s["ideal"] if "ideal" in prefill_s else None,
        "ideal": ideal_reason or f"ideal at {_runs(counts)} visual tokens per layer",
        "decoder_flops": stats.flops_exact, "decoder_flops_unreduced": stats.flops_exact_full,
        "kv_bytes": stats.kv_bytes, "kv_bytes_unreduced": stats.kv_bytes_full,
        "peak_memory_bytes": {"unreduced": _peak_memory(ctx, generate["unreduced"]),
                              "reduced": _peak_memory(ctx, generate["reduced"])},
    }
    vs_ideal = f", {numbers['prefill_vs_ideal']:.2f}x its ideal" if numbers["prefill_vs_ideal"] else ", no ideal (JSON says why)"
    peak = numbers["peak_memory_bytes"]
    memory = (f"; peak memory {peak['reduced'] / 2**30:.2f} GiB ({peak['reduced'] / peak['unreduced']:.2f}x)"
              if peak["reduced"] else "")
    detail = (f"prefill {prefill_s['reduced']:.3g} s ({numbers['prefill_vs_unreduced']:.2f}x unreduced{vs_ideal}); "
              f"generate {generate_s['reduced']:.3g} s ({numbers['generate_vs_unreduced']:.2f}x); decoder FLOPs "
              f"{stats.flops_ratio:.2f}x, KV bytes {stats.kv_bytes / max(stats.kv_bytes_full, 1):.2f}x{memory}")
    return Result("timing", "speed, FLOPs and memory (measured)", INFO, detail, numbers)


# ----------------------------------------------------------------------------- runs
CHECKS = ("full", "restored", "padded", "counts", "ideal", "modes", "timing")


def check_model(model, batch: dict, rows: list[dict], method: str = "duet", budget: Optional[int] = None,
                ratio: Optional[float] = None, rounds: int = 3, new_tokens: int = 4, skip: tuple[str, ...] = (),
                progress=None, options: Optional[dict] = None) -> Report:
    """Run every check on ``model`` with a left-padded ``batch`` and its ``rows`` alone (unpadded,
    one dict of inputs each). ``skip``: check names of ``CHECKS`` to leave out (reported ``n/a``);
    ``progress(label)``: called as work advances."""
    budget = default_budget(method, budget, ratio)
    make(method, budget=budget, ratio=ratio, **(options or {}))  # a bad method or budget fails here
    ctx = Context(model, batch, rows, lambda: make(method, budget=budget, ratio=ratio, **(options or {})), new_tokens)
    step = progress or (lambda label: None)
    plain = ctx.logits(batch)
    results: list[Result] = []
    runs: list[tuple[str, Callable[[], list[Result] | Result]]] = [
        ("full", lambda: check_full(ctx, plain)),
        ("padded", lambda: check_padded(ctx)),
        ("counts", lambda: check_counts(ctx)),
        ("ideal", lambda: check_ideal(ctx)),
        ("modes", lambda: check_modes(ctx)),
        ("timing", lambda: check_timing(ctx, rounds, progress)),
        ("restored", lambda: check_restored(ctx)),
    ]
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup, model_result = check_setup(ctx, method)
        results.append(model_result)
        for key, run in runs:
            _run_one(key, run, skip, results, step)
    said = [f"{w.category.__name__}: {w.message}" for w in caught if w.category.__module__.startswith("duet_vlm")]
    setup["warnings"] = list(dict.fromkeys(said))
    setup["seconds"] = round(time.perf_counter() - started, 1)  # every check, the model loaded
    return Report(setup, results, versions())


def _run_one(key: str, run, skip: tuple[str, ...], results: list[Result], step) -> None:
    """Run one check (``n/a`` if skipped; a check that raises is a failed check, with its reason)."""
    step(key)
    if key in skip:
        results.append(Result(key, key, NOT_APPLICABLE, "skipped (--skip)"))
        return
    started = time.perf_counter()
    try:
        found = run()
    except Exception as error:  # a check that crashes is a failed check, with its reason
        found = Result(key, key, FAIL, f"raised {type(error).__name__}: {' '.join(str(error).split())[:200]}")
    found = found if isinstance(found, list) else [found]
    found[0].numbers.setdefault("seconds", round(time.perf_counter() - started, 3))  # a group's time: on its first
    results.extend(found)


DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo_model"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_checkpoint(model: str, method: str = "duet", budget: Optional[int] = None, ratio: Optional[float] = None,
                     device: str = "cpu", dtype: str = "auto", attn: Optional[str] = None,
                     images: Optional[list[Path]] = None, rounds: int = 3, new_tokens: int = 4,
                     skip: tuple[str, ...] = (), progress=None) -> Report:
    """Load ``model`` (a path or a Hub id) on ``device`` in ``dtype`` with the attention backend
    ``attn`` (the checkpoint's default when ``None``), build a padded batch of two prompts (the
    ``images`` given, else two drawn scenes, the second resized to another aspect) and their rows
    alone with its processor, and run ``check_model``."""
    from transformers import AutoModelForImageTextToText

    from ..compare import load_processor

    make(method, budget=default_budget(method, budget, ratio), ratio=ratio)  # fail before loading
    if model == "demo":
        model = str(DEMO_MODEL)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    unknown = [s for s in skip if s not in CHECKS]
    if unknown:
        raise ValueError(f"--skip {', '.join(unknown)}: the checks are {', '.join(CHECKS)}")
    pictures = _pictures(images)
    kwargs = {"dtype": DTYPES[dtype]}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    try:
        processor = load_processor(model)  # before the weights: a processor that cannot be built fails fast
        loaded = AutoModelForImageTextToText.from_pretrained(model, **kwargs).to(device).eval()
    except OSError as error:
        raise OSError(f"cannot load a checkpoint from --model {model!r}: {error}") from error
    except ImportError as error:  # e.g. --attn flash_attention_2 without the flash-attn package
        raise ValueError(f"cannot load --model {model!r} with --attn {attn}: {error}") from error
    batch, rows = prompts(processor, pictures, device, next(loaded.parameters()).dtype)
    return check_model(loaded, batch, rows, method, budget, ratio, rounds, new_tokens, skip, progress)


QUESTIONS = ("What is shown in the image?", "How many objects are in the picture? Answer with a number.")


def _pictures(images: Optional[list[Path]]) -> list:
    from ..compare import read_image
    from ..synthetic import sample

    if images:
        if len(images) > 2:
            raise ValueError("--image: give at most two (the batch has two rows)")
        pictures = [read_image(path) for path in images]
    else:
        pictures = [sample("test", 0).image]
    if len(pictures) == 1:  # the second row: the same picture at another aspect, so the rows differ in size
        width, height = pictures[0].size
        pictures.append(pictures[0].resize((max(28, width * 3 // 4), height)))
    return pictures


def prompts(processor, pictures: list, device, dtype=None) -> tuple[dict, list[dict]]:
    """A left-padded batch of two questions of different lengths, one picture each, and each row alone."""
    from ..compare import one_image_per_row
    from ..evaluation import chat_prompt

    texts = [chat_prompt(processor, question) for question in QUESTIONS]

    def encode(index: slice, padding: bool) -> dict:
        extra = {"padding": True, "padding_side": "left"} if padding else {}
        encoded = processor(images=one_image_per_row(pictures[index]), text=texts[index], return_tensors="pt", **extra)
        return {key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
                for key, value in encoded.items()}

    return encode(slice(0, 2), True), [encode(slice(b, b + 1), False) for b in range(2)]
