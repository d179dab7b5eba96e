"""Checks and helpers that more than one test module uses (issue #31).

A test module imports these from here (``from checks import ...``; tests/ is on ``sys.path`` as
for ``models``), never from another test module: tests/test_test_layout.py fails on an import of a
``test_*`` module. The tiny models and their prompts are in tests/models.py, the fixtures in
tests/conftest.py.

- Hooks and counts: ``hook_ids``, ``LayerInputs``, ``layer_calls``, ``generate_and_check_counts``.
- Values compared across calls and threads: ``plain``, ``same``, ``outcome``, ``run_overlapping``.
- Prompts and calls of generation modes: ``twice``, ``lookup_prompt`` (``MARK``), ``second_turn``,
  ``TokenCount``.
- Replays of the official code's recorded outputs: ``RecordedVisualBlock``, ``assert_replays_recorded_run``; textbook references:
  ``cosine``, ``reference_nms``.
- Training data: ``write_llava_json``.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LogitsProcessor
from transformers.generation.streamers import BaseStreamer

import duet_vlm
from duet_vlm import synthetic
from duet_vlm.adapters import adapter_for
from duet_vlm import compat
from duet_vlm.compat import with_cache
from duet_vlm.check import LayerLengths, hook_ids  # noqa: F401 - the check's own, shared with the tests
from duet_vlm.plan import VisionReduction, VisionStage

from models import FAMILIES, make_inputs, make_llava, row


# ----------------------------------------------------------------------------- hooks and counts
# Sequence lengths entering each decoder layer, per call, seen by hooks registered after the
# reducer's (hooks fire in registration order, so these see the reducer's output; a stage that runs
# a layer itself does so before that layer's real call, hence "last call wins"): the one duet-vlm
# check counts with.
LayerInputs = LayerLengths


def _visual_token_count(model, input_ids) -> int:
    """Placeholder tokens of images and videos, by the ids the model's config names."""
    ids = [getattr(model.config, key, None) for key in ("image_token_id", "video_token_id")]
    return int(sum((input_ids == i).sum() for i in ids if i is not None))


@contextlib.contextmanager
def layer_calls(layers):
    """``(length, position ids)`` of every call of each of ``layers`` in the block, in call order (a
    forward pre-hook each, removed after): what the official recordings log per decoder layer."""
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape[1], kwargs["position_ids"].reshape(-1).tolist()))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def assert_replays_recorded_run(expected: dict, tensors: dict, input_ids, logits, prefill, seen, generated,
                                layers: int) -> None:
    """A run equals an official recording in the layout the DART and V2Drop vectors share
    (tests/data/vectors/README.md): each layer's length and positions in the prefill (``prefill``,
    ``layer_calls``'s), the prefill's last logits and every greedy step's (atol 1e-4), the greedy
    tokens, and each decoding step's lengths and positions per layer (``seen``: ``generate``'s calls
    of the ``layers`` decoder layers, its prefill first)."""
    assert [length for length, _ in prefill] == expected["prefill_per_layer_seq_len"]
    assert [positions for _, positions in prefill] == expected["prefill_per_layer_position_ids"]
    torch.testing.assert_close(logits, tensors["prefill_last_logits"], atol=1e-4, rtol=0)
    assert generated.sequences[0, input_ids.shape[1]:].tolist() == expected["greedy_new_tokens"]
    for step, scores in enumerate(generated.scores):
        torch.testing.assert_close(scores[0], tensors[f"gen_step{step}_logits"], atol=1e-4, rtol=0)
    steps = [seen[k * layers: (k + 1) * layers] for k in range(1, len(generated.scores))]
    assert [[length for length, _ in step] for step in steps] == expected["decode_step_seq_len_per_layer"]
    assert [[p[0] for _, p in step] for step in steps] == expected["decode_step_position_ids_per_layer"]


def generate_and_check_counts(model, name, inputs):
    """``generate`` under ``make(name, ratio=0.5)``: the visual tokens each decoder layer receives
    equal the sum of the items' stats, every item averages half its tokens (within a frame count:
    a vision stage keeps the same count in every frame), each layer's KV cache holds its prefill
    plus the generated tokens, and no hook is left behind. Returns the items' stats."""
    text = inputs["input_ids"].shape[1] - _visual_token_count(model, inputs["input_ids"])
    reducer = duet_vlm.make(name, ratio=0.5)
    hooks = hook_ids(model)
    handle = reducer.attach(model)
    probe = LayerInputs(model)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    finally:
        probe.remove()
        handle.remove()
    assert hook_ids(model) == hooks
    items = reducer.stats.items
    lengths = sorted(probe.calls[0].items())
    cut = adapter_for(model).scheme.queries_cut_from
    if cut is not None:  # Gemma 4 (transformers 5.23+) passes its KV-shared layers only the prompt's last token
        assert [length for layer, length in lengths if layer >= cut] == [1] * (len(lengths) - cut)
        lengths = lengths[:cut]
    seen = [length - text for _, length in lengths]
    assert seen == [sum(i.tokens_per_layer[layer] for i in items) for layer in range(len(seen))]
    for item in items:
        expected = item.tokens if name == "full" else round(0.5 * item.tokens)
        assert abs(item.average_tokens - expected) <= max(1, item.units), (item.modality, item.tokens_per_layer)
    generated = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    reusing = {i for i, mode in enumerate(compat.kv_sharing_modes(model.config.get_text_config())) if mode == "reuse"}
    for layer, visual in enumerate(seen):
        if layer in reusing:  # Gemma 4's KV-shared layers cache nothing (their keys are an earlier layer's)
            continue
        cached = out.past_key_values.layers[layer]
        if hasattr(cached, "recurrent_states"):  # linear attention: a state of fixed size, whatever the tokens
            module = model.get_decoder().layers[layer].linear_attn
            batch = inputs["input_ids"].shape[0]
            assert cached.conv_states[0].shape == (batch, module.conv_dim, module.conv_kernel_size), f"layer {layer}"
            heads, k, v = module.num_v_heads, module.head_k_dim, module.head_v_dim
            assert cached.recurrent_states[0].shape == (batch, heads, k, v), f"layer {layer}"
            continue
        if getattr(cached, "is_sliding", False):  # a sliding window: every token counted, the last W - 1 kept
            assert cached.cumulative_length == text + visual + generated - 1, f"layer {layer}"
            assert cached.keys.shape[-2] == min(text + visual + generated - 1, cached.sliding_window - 1), f"layer {layer}"
            continue
        assert cached.keys.shape[-2] == text + visual + generated - 1, f"layer {layer}"
    return items


# ----------------------------------------------------------------------------- values across calls and threads
def assert_step_equals_ideal(model, reducer, inputs: dict, parts: dict, ideal) -> None:
    """A training step under ``reducer`` against its ideal: the reduced model's loss on ``inputs``
    (labels included) and ``ideal()``, the unpatched model's loss on the kept tokens (called after,
    so it may read the reducer's statistics), must be equal, and so must the gradients of ``parts``
    (``{name: parameter}``), every one nonzero."""
    model.zero_grad(set_to_none=True)
    try:
        with reducer(model):
            loss = model(**inputs).loss
            loss.backward()
        grads = {name: p.grad.clone() for name, p in parts.items()}
        model.zero_grad(set_to_none=True)
        expected = ideal()
        expected.backward()
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        for name, p in parts.items():
            assert grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    finally:
        model.zero_grad(set_to_none=True)


def placeholder_runs(ids: torch.Tensor, token: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of ``token`` placeholders in one row of ids."""
    runs: list[list[int]] = []
    for position in (ids == token).nonzero()[:, 0].tolist():
        if runs and position == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([position, 1])
    return [(start, length) for start, length in runs]


def next_slots(kept: torch.Tensor, length: int) -> torch.Tensor:
    """Where the reduced model's logits of kept token ``j`` sit in its full-length output: just before
    kept token ``j + 1``'s slot (the last at the end), as transformers' shifted loss reads them."""
    return torch.cat([kept[1:] - 1, torch.tensor([length - 1])])


def kept_slots(reducer, ids: torch.Tensor, token: int) -> torch.Tensor:
    """The full-input slots the vision stage of each item of one row filled (``entry_slots``, from
    ``reducer.stats``), items in order of their runs of ``token`` placeholders."""
    starts = [start for start, _ in placeholder_runs(ids, token)]
    return torch.cat([start + item.entry_slots for start, item in zip(starts, reducer.stats.items)])


def fastv_kept_by_hand(attention: torch.Tensor, ids: torch.Tensor, token: int, items, boundary: int) -> torch.Tensor:
    """The positions FastV keeps in one row, chosen by hand: every other token, and of each run of
    ``token`` placeholders (an item) the top ``items[i].tokens_per_layer[boundary]`` by ``attention``
    (``(L,)``: the last token's row of layer ``boundary - 1``'s eager map, mean over heads)."""
    keep = ids != token
    for (start, length), item in zip(placeholder_runs(ids, token), items):
        keep[start + attention[start : start + length].topk(item.tokens_per_layer[boundary]).indices] = True
    return keep.nonzero()[:, 0]


def gemma_masks(model, hidden: torch.Tensor, types: torch.Tensor) -> dict:
    """The masks the unpatched Gemma (3 or 4) builds for a sequence of ``hidden`` states whose image
    tokens ``types`` marks (per layer type), from the model's own modeling module."""
    import sys

    gemma = sys.modules[type(model.model).__module__]
    blocks = gemma.get_block_sequence_ids_for_mask(types, device=hidden.device)
    return gemma.create_masks_for_vision_model(
        config=model.config.text_config, inputs_embeds=hidden, attention_mask=torch.ones_like(types),
        **with_cache(None), position_ids=None, block_sequence_ids=blocks,
    )


def nudged_layer_outputs(model, reducer, inputs: dict, layer_index: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder layer ``layer_index``'s output in row 0 under ``reducer``, as it is and with 1.0 added
    to its input state at ``slot`` (of the sequence the layer sees): what moves attends to that slot."""
    layer = model.model.language_model.layers[layer_index]
    outputs = []
    for nudge in (0.0, 1.0):
        captured = {}

        def perturb(module, args, kwargs, nudge=nudge):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            hidden[:, slot] += nudge
            return (hidden, *args[1:]), kwargs

        with torch.no_grad(), reducer(model):
            handles = [layer.register_forward_pre_hook(perturb, with_kwargs=True),
                       layer.register_forward_hook(lambda m, a, o: captured.update(out=o[0] if isinstance(o, tuple) else o))]
            try:
                model(**inputs)
            finally:
                for handle in handles:
                    handle.remove()
        outputs.append(captured["out"][0])
    return outputs[0], outputs[1]


def assert_cached_equals_uncached(model, reducer, inputs: dict, new_tokens: int, beams: int = 1) -> None:
    """``generate`` under ``reducer`` with the cache and without it (prefilling again at every step):
    the same sequences, and the same logits at every step (1e-4)."""
    runs = []
    for use_cache in (True, False):
        with torch.no_grad(), reducer(model):
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                                 num_beams=beams, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        runs.append(out)
    cached, uncached = runs
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")


def assert_refused_and_left_as_it_was(model, inputs: dict, bad: dict, error, message: str) -> None:
    """A forward on ``bad`` inputs under ``duet`` at budget 8 raises ``error`` matching ``message``;
    afterwards the hooks are the ones before and ``inputs`` give the unpatched logits bit for bit."""
    import pytest

    hooks = hook_ids(model)
    with torch.no_grad():
        plain = model(**inputs).logits
        with pytest.raises(error, match=message), duet_vlm.make("duet", budget=8)(model):
            model(**bad)
        assert hook_ids(model) == hooks
        torch.testing.assert_close(model(**inputs).logits, plain, rtol=0, atol=0)


def run_two_ranks(worker, out: Path) -> list:
    """``worker(rank, 2, port, out)`` in two spawned processes, then each rank's ``rank{r}.pt``. The
    spawned workers import the test module that defines ``worker`` from this folder."""
    import sys

    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def plain(value):
    """A comparable form of stats (nested dataclasses, tensors, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), value.tolist())
    if is_dataclass(value):
        return (type(value).__name__, {f.name: plain(getattr(value, f.name)) for f in fields(value)})
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def outcome(call):
    """What a call gives: its value, or its exception's type and message (never raised here)."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - compared as values
        return f"{type(error).__name__}: {error}"


def run_overlapping(jobs, rounds: int, seed: int):
    """Each round runs every job once, each in its own thread, released together by a barrier (in a
    shuffled order); returns per round the list of outcomes in job order."""
    rng = random.Random(seed)
    results = []
    for _ in range(rounds):
        order = list(range(len(jobs)))
        rng.shuffle(order)
        barrier = threading.Barrier(len(jobs))

        def run(index):
            barrier.wait(timeout=120)
            return index, outcome(jobs[index])

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            done = dict(pool.map(run, order))
        results.append([done[i] for i in range(len(jobs))])
    return results


# ----------------------------------------------------------------------------- generation modes
def twice(inputs):
    """A batch of two rows, each the prompt of ``inputs`` (one row)."""
    return {k: torch.cat([v, v]) for k, v in inputs.items()}


class Force(LogitsProcessor):
    """Forces ``tokens`` from sequence length ``at`` on: a turn's text decoded token by token."""

    def __init__(self, at: int, tokens: list[int]):
        self.at, self.tokens = at, tokens

    def __call__(self, input_ids, scores):
        i = input_ids.shape[1] - self.at
        if 0 <= i < len(self.tokens):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.tokens[i]] = 0
            return forced
        return scores


class TokenCount(BaseStreamer):
    """How many times ``generate`` handed tokens out (the prompt first, then each accepted chunk)."""

    def __init__(self):
        self.puts = 0

    def put(self, value):
        self.puts += 1

    def end(self):
        pass


MARK = [901, 902]  # two tokens make_inputs never draws


def lookup_prompt(model, drafts=(904, 905, 906), seed: int = 3):
    """A prompt whose last two tokens repeat two tokens of its text after the image: prompt lookup
    drafts the three that followed them (``drafts``) into the prefill itself."""
    inputs = make_inputs(model, seed=seed)
    tail = torch.tensor([MARK + list(drafts) + [903] + MARK])
    ids = torch.cat([inputs["input_ids"], tail], dim=1)
    return {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def second_turn(model, reducer=None):
    """A cached second turn bringing a new image: three greedy tokens after a first prompt, then
    three more after the second prompt, its pixels and the first turn's cache (under ``reducer``)."""
    first_turn, new_image = make_inputs(model, seed=31), make_inputs(model, seed=32)
    with torch.no_grad(), (reducer(model) if reducer is not None else contextlib.nullcontext()):
        first = model.generate(**first_turn, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([first.sequences, new_image["input_ids"][:, 1:]], dim=1)
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=new_image["pixel_values"],
            past_key_values=first.past_key_values, max_new_tokens=3, do_sample=False,
        )


# ----------------------------------------------------------------------------- official code and references
class RecordedVisualBlock(VisionStage):
    """A vision stage that hands the language model the official run's merged visual block."""

    def __init__(self, features):
        self.features = features

    def reduce(self, view, keep):
        kept = torch.arange(1, keep + 1)[None]  # stand-in indices (statistics only)
        return VisionReduction(view.features[:, 1 : keep + 1], kept, projected=self.features[None])


def cosine(features):
    """Pairwise cosine similarity of the rows of ``features`` (float32, clamped to [-1, 1])."""
    unit = F.normalize(features.float(), dim=-1)
    return (unit @ unit.transpose(-1, -2)).clamp(-1, 1)


def reference_nms(saliency, features, keep, threshold):
    """Textbook greedy NMS, one token at a time, then fill with the most salient suppressed tokens."""
    similarity = cosine(features)
    order = sorted(range(len(saliency)), key=lambda i: (-float(saliency[i]), i))
    kept, suppressed = [], set()
    for i in order:
        if len(kept) == keep:
            break
        if i in suppressed:
            continue
        kept.append(i)
        suppressed |= {j for j in order if j not in kept and similarity[i, j] >= threshold}
    fill = [i for i in order if i not in kept][: keep - len(kept)]
    return sorted(kept + fill), len(kept)


# ----------------------------------------------------------------------------- training data
def write_llava_json(folder: Path, n: int = 4, **overrides) -> Path:
    """``n`` synthetic conversations in LLaVA's JSON format, images as PNG files under ``folder/images``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(n):
        image, turns, _ = synthetic.conversation("train", index, n_questions=2)
        image.save(folder / "images" / f"{index}.png")
        conversations = []
        for k, (_qtype, question, answer) in enumerate(turns):
            conversations += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                              {"from": "gpt", "value": answer}]
        items.append({"id": str(index), "image": f"{index}.png", "conversations": conversations})
    items[0].update(overrides)
    path = folder / "data.json"
    path.write_text(json.dumps(items))
    return path


# ----------------------------------------------------------------------------- training past one process
def two_rank_model():
    """The tiny LLaVA-1.5 of the distributed tests (tests/test_fsdp.py, tests/test_deepspeed.py), seeded."""
    torch.manual_seed(0)
    return make_llava(layers=4, image_size=112, vision_layers=3).train()


def two_rank_rows(model) -> list[dict]:
    """The two rows of a batch, each alone: rank ``r`` trains on row ``r``."""
    inputs = make_inputs(model, batch=2, suffix=(9, 4), seed=2)
    return [row(inputs, b) for b in range(2)]


def answer_labels(inputs) -> torch.Tensor:
    labels = inputs["input_ids"].clone()
    labels[labels == 999] = -100  # the image placeholders
    return labels


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_step_equals_one_process(name: str, ratio: float, per_rank: list[tuple], zero_filled: bool = False) -> None:
    """Each rank's ``(loss, gradients)`` from a distributed training step under ``make(name, ratio=...)``
    against one process running both rows alone and averaging their losses: the rank's loss (1e-6)
    and every parameter's gradient (1e-6, 1e-5 relative). ``zero_filled``: the engine keeps a
    gradient for every trainable parameter (DeepSpeed), zeros where none flows."""
    model = two_rank_model()
    losses = []
    with duet_vlm.make(name, ratio=ratio)(model):
        for inputs in two_rank_rows(model):
            losses.append(model(**inputs, labels=answer_labels(inputs)).loss)
        (sum(losses) / len(losses)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank, (loss, reduced) in enumerate(per_rank):
        torch.testing.assert_close(loss, losses[rank].detach(), atol=1e-6, rtol=1e-6)
        if zero_filled:
            assert grads.keys() <= reduced.keys()
            assert all(not reduced[n].any() for n in reduced.keys() - grads.keys())
        else:
            assert reduced.keys() == grads.keys()
        for parameter, grad in grads.items():
            torch.testing.assert_close(reduced[parameter], grad, atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"{parameter}: {m}")


def release_needed(model) -> str | None:
    """The transformers release ``model``'s family needs where the installed one is older (the attach
    refuses it, naming that release), else ``None``: ``compat.release_needed`` of its adapter."""
    from duet_vlm.adapters import ADAPTERS

    return compat.release_needed(next(adapter for adapter in ADAPTERS if adapter.matches(model)).family)


#: ``duet-vlm check``'s checks a family may leave not applicable, and why (the report says the same).
EXPECTED_NOT_APPLICABLE = {
    ("gemma4", "ideal"): "per-layer inputs",
    ("qwen3_5", "mode:prompt_lookup"): "stateful",
    ("qwen3_5-moe", "mode:prompt_lookup"): "stateful",
    # transformers 5.19.0 to 5.20.1 (CI's oldest lane): refused by name (``compat.check_reencoded``)
    ("qwen3_5", "mode:no_cache"): "needs transformers 5.20.2 or newer",
    ("qwen3_5-moe", "mode:no_cache"): "needs transformers 5.20.2 or newer",
    # before 5.24: a static cache under a reduction is refused by name (``compat.check_static_cache``);
    # Gemma 4's own static cache differs from its dynamic one there, unpatched
    **{(name, "mode:static_cache"): "needs transformers 5.24 or newer" for name in FAMILIES if name != "gemma4"},
    ("gemma4", "mode:static_cache"): "the unpatched model's static cache",
}


def assert_check_passes(report, family_name: str) -> None:
    """Every check of a ``duet-vlm check`` report passed, gave information, was skipped, or is not
    applicable for the reason ``EXPECTED_NOT_APPLICABLE`` gives; every other result is listed."""
    from duet_vlm.check.report import NOT_APPLICABLE, PASS

    failed = []
    for result in report.results:
        if result.detail == "skipped (--skip)":
            continue
        if result.status == NOT_APPLICABLE:
            reason = EXPECTED_NOT_APPLICABLE.get((family_name, result.key))
            if reason is None or reason not in result.detail:
                failed.append((result.key, result.status, result.detail))
        elif result.status not in (PASS, "info"):
            failed.append((result.key, result.status, result.detail))
    assert not failed and report.ok, failed


def family_on(family, dtype: torch.dtype, device: str = "cpu", attn: str | None = None):
    """A fresh copy of ``family``'s tiny model (tests/models.py) on ``device`` in ``dtype`` (under the
    attention backend ``attn``, if given), run once on its one-item input (transformers adds its
    output-capturing hooks at the first forward); returns it, its padded batch and each row alone."""
    def moved(inputs: dict) -> dict:
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}

    model = family.build().eval().to(device, dtype)
    if attn is not None:
        model.set_attn_implementation(attn)
    with torch.no_grad():
        model(**moved(family.one(model)))
    batch = moved(family.batch(model))
    return model, batch, [family.row(batch, b) for b in range(batch["input_ids"].shape[0])]


def near_tied_differences(own: tuple, theirs: tuple, has_cls: bool) -> dict[str, list]:
    """Where two engines' vision stages chose differently from their own scores, the tokens that
    differ, by role: each must be near-tied, or the check fails.

    ``own`` and ``theirs``: ``(scores (U, P), {role: (U, k) token indices})`` of one item, each
    engine's scores and the roles its stage returned (``"kept"`` among them). The two kernels'
    measured difference is ``delta``, the largest ``|own - theirs|`` over the item's scores, which must
    itself be float32 accumulation (at most 1e-4 of the largest score; the tiny models' towers give
    up to 3e-5: another order of summation over hundreds of keys). A role that is a ranking by score
    (its tokens are the top ``k`` of ``own``'s scores: DUET's dominant tokens, VisionZip's) may
    differ only in tokens whose scores lie within ``2 * delta`` of the role's cut, the midpoint
    between its ``k``-th and ``k+1``-th best scores, under either engine's scores; a role that ranks
    nothing by score (clusters, merges) is not judged here: the selection on identical inputs
    (the Hugging Face path fed vLLM's scores) is exact, and that is compared separately. Returns
    ``{role: differing tokens}`` (empty where both engines agree)."""
    own_scores, own_roles = own
    their_scores, their_roles = theirs
    own_scores, their_scores = own_scores.float().cpu(), their_scores.float().cpu()
    assert own_scores.shape == their_scores.shape, (own_scores.shape, their_scores.shape)
    delta = (own_scores - their_scores).abs().max().item()
    rounding = 1e-4 * their_scores.abs().max().item()
    assert delta <= rounding, f"the engines' scores differ by {delta:.3g}, beyond float32 accumulation ({rounding:.3g})"
    cls = int(has_cls)
    differing: dict[str, list] = {}
    for role in sorted(set(own_roles) | set(their_roles)):
        mine, yours = own_roles[role].cpu(), their_roles[role].cpu()
        for unit in range(own_scores.shape[0]):
            a = {int(t) for t in mine[unit].reshape(-1).tolist() if t >= cls}
            b = {int(t) for t in yours[unit].reshape(-1).tolist() if t >= cls}
            if a == b:
                continue
            k = len(a)
            order = own_scores[unit].argsort(descending=True)
            if {int(p) + cls for p in order[:k].tolist()} != a or k >= order.numel():
                continue  # not a ranking by score
            cut = (own_scores[unit, order[k - 1]] + own_scores[unit, order[k]]).item() / 2
            for token in sorted(a ^ b):
                gap = min(abs(own_scores[unit, token - cls].item() - cut), abs(their_scores[unit, token - cls].item() - cut))
                assert gap <= 2 * delta, (
                    f"{role}: token {token} of unit {unit} is chosen by one engine only, {gap:.3g} from the cut, "
                    f"beyond the engines' measured difference ({delta:.3g})"
                )
            differing.setdefault(role, []).extend(sorted(a ^ b))
    return differing


#: aten operations that read a device tensor's value on the host.
HOST_SYNCS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal"}


class DecodingSyncs(TorchDispatchMode):
    """Per decoding step of ``generate`` (a forward of one new token per row), the host syncs in it
    (``HOST_SYNCS``), counted from the model's own entry on: the runtime's hooks and the model's work."""

    def __init__(self, model):
        super().__init__()
        self.model, self.steps, self.counting = model, [], False

    def __enter__(self):
        def start(module, args, kwargs):
            ids = kwargs.get("input_ids")
            self.counting = ids is not None and ids.shape[1] == 1
            if self.counting:
                self.steps.append(0)

        def stop(module, args, kwargs, output):
            self.counting = False

        self.handles = [self.model.register_forward_pre_hook(start, with_kwargs=True, prepend=True),
                        self.model.register_forward_hook(stop, with_kwargs=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and func.overloadpacket.__name__ in HOST_SYNCS:
            self.steps[-1] += 1
        return func(*args, **(kwargs or {}))


def decoding_syncs(model, inputs: dict, reducer=None, **generate_kwargs) -> list[int]:
    """The host syncs of each decoding step of a 3-token greedy ``generate`` (``generate_kwargs``:
    more of its options, a static cache)."""
    with torch.no_grad(), (reducer(model) if reducer is not None else contextlib.nullcontext()):
        with DecodingSyncs(model) as counter:
            model.generate(**inputs, max_new_tokens=3, do_sample=False, **generate_kwargs)
    return counter.steps
