"""Runtime behaviours no other test checked (issue #31's audit: plausible bugs that survived the suite).

- Training selects what inference selects: a vision stage that reads the prompt's text (CDPruner)
  reads the instruction only, never the answer it is trained to produce.
- An attach that fails part-way leaves the model exactly as it was.
- Two threads attaching to one model at the same moment: exactly one wins.
- A cache cropped below a reduced prefill is refused at the next decoding step.
- Qwen's decoding positions with one ``rope_deltas`` row per prompt and several copies of each.

Each test was run against a planted bug (the label filter removed, no rollback of a failed attach,
the crop guard removed, the deltas tiled instead of repeated per prompt) and failed.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import duet_vlm
from models import make_inputs, make_llava


@pytest.fixture(scope="module")
def guards_llava():
    """The family matrix's LLaVA-1.5 shape: 64 patches, 6 decoder layers."""
    return make_llava(layers=6, image_size=112, vision_layers=3)


def hooks(model) -> list[tuple[str, str, int]]:
    """Every forward hook and pre-hook on ``model``'s modules, by module name and kind."""
    found = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks"):
            found += [(name, kind, key) for key in getattr(module, kind)]
    return sorted(found)


# ----------------------------------------------------------------------------- training reads the instruction only
def _with_answer(inputs: dict, answer: list[int]) -> dict:
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    labels = torch.full_like(ids, -100)
    labels[0, -len(answer):] = torch.tensor(answer)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": inputs["pixel_values"], "labels": labels}


def test_training_selects_what_inference_selects(guards_llava):
    """Under CDPruner (its selection is conditioned on the prompt's text), a training forward with
    labels keeps the tokens the inference forward keeps on the prompt without its answer, and the
    logits before the answer do not depend on which answer follows. Fails if the answer tokens
    reach the stage's text (the label filter of ``prefill._text_tokens`` removed)."""
    prompt = make_inputs(guards_llava, suffix=6, seed=3)
    reducer = duet_vlm.make("cdpruner", budget=16)
    length = prompt["input_ids"].shape[1]
    with torch.no_grad(), reducer(guards_llava):
        guards_llava(**prompt)
        inference = reducer.stats.items[0].vision_kept.clone()
        runs = []
        for answer in ([11, 12, 13, 14, 15, 16, 17, 18], [801, 802, 803, 804, 805, 806, 807, 808]):
            out = guards_llava(**_with_answer(prompt, answer))
            runs.append((reducer.stats.items[0].vision_kept.clone(), out.logits[0, :length]))
    for kept, _ in runs:
        assert torch.equal(kept, inference)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


# ----------------------------------------------------------------------------- attach: all or nothing
def test_an_attach_that_fails_part_way_leaves_the_model_as_it_was(guards_llava):
    """A reducer reading an encoder layer the tower lacks fails at attach, after some hooks are in:
    the error names the layer, the model's hooks are exactly those it had, the model computes what
    it computed, and a later attach installs its usual hook set."""
    inputs = make_inputs(guards_llava, seed=4)
    with torch.no_grad():
        before_logits = guards_llava(**inputs).logits
    before = hooks(guards_llava)
    bad = duet_vlm.make("trio_scan", budget=16, local_layer=40)
    with pytest.raises(ValueError, match="encoder layer 40 does not exist"):
        bad.attach(guards_llava)
    assert hooks(guards_llava) == before
    with torch.no_grad():
        assert torch.equal(guards_llava(**inputs).logits, before_logits)
    good = duet_vlm.make("trio_scan", budget=16)
    handle = good.attach(guards_llava)
    try:
        usual = len(hooks(guards_llava)) - len(before)
        assert usual > 0
    finally:
        handle.remove()
    assert hooks(guards_llava) == before
    reference = duet_vlm.make("trio_scan", budget=16)
    handle = reference.attach(guards_llava)
    try:
        assert len(hooks(guards_llava)) - len(before) == usual
    finally:
        handle.remove()


def test_concurrent_attaches_to_one_model_let_exactly_one_win(guards_llava):
    """Threads that each attach their own reducer to one model at the same moment: one succeeds,
    every other gets the "already attached" error, and removing the winner leaves no hook behind.
    The interpreter switches threads every microsecond here, so a check and an install that are not
    one atomic step lose the race within a few tries."""
    before = hooks(guards_llava)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _race(guards_llava, before)
    finally:
        sys.setswitchinterval(interval)


def _race(model, before):
    for _ in range(20):
        start = threading.Barrier(4)
        won, refused, other = [], [], []

        def attach():
            reducer = duet_vlm.make("fastv", budget=32)
            start.wait()
            try:
                won.append(reducer.attach(model))
            except RuntimeError as error:
                (refused if "already attached" in str(error) else other).append(error)
            except BaseException as error:  # noqa: BLE001 - reported below
                other.append(error)

        threads = [threading.Thread(target=attach) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for handle in won:
            handle.remove()
        assert not other, other
        assert (len(won), len(refused)) == (1, 3)
        assert hooks(model) == before


# ----------------------------------------------------------------------------- a cropped cache
def test_a_cache_cropped_into_a_reduced_prefill_is_refused(guards_llava):
    """After a prefill under a method that prunes inside the language model, cropping the cache into
    the prompt (as assisted decoding crops its drafts) and stepping once is refused: the tokens kept
    after the boundary were chosen by the prompt's end, which is no longer there."""
    inputs = make_inputs(guards_llava, suffix=6, seed=5)
    length = inputs["input_ids"].shape[1]
    reducer = duet_vlm.make("fastv", budget=32)
    with torch.no_grad(), reducer(guards_llava):
        out = guards_llava(**inputs, use_cache=True)
        cache = out.past_key_values
        cache.crop(-3)  # three tokens off every layer, as assisted decoding drops rejected drafts
        token = torch.tensor([[7]])
        mask = torch.ones(1, length + 1, dtype=torch.long)
        with pytest.raises(NotImplementedError, match="cache was cropped into the prefill"):
            guards_llava(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
    # without the crop, the same step runs
    with torch.no_grad(), reducer(guards_llava):
        out = guards_llava(**inputs, use_cache=True)
        step = guards_llava(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert step.logits.shape == (1, 1, guards_llava.config.text_config.vocab_size)


# ----------------------------------------------------------------------------- Qwen: one rope_deltas row per prompt
def _same_length_prompts(model, grids, seed=0):
    """Rows of one image each (``grids``: patches ``(h, w)``, the same number of merged tokens), the
    same text lengths: a batch without padding whose rows' M-RoPE deltas differ."""
    from models import PATCH, _qwen_row

    generator = torch.Generator().manual_seed(seed)
    rows = [_qwen_row(generator, [("image", h, w)], frames_apart=model.config.model_type == "qwen3_vl") for h, w in grids]
    assert len({len(ids) for ids, _ in rows}) == 1
    return {
        "input_ids": torch.tensor([ids for ids, _ in rows]),
        "mm_token_type_ids": torch.tensor([types for _, types in rows]),
        "pixel_values": torch.randn(sum(h * w for h, w in grids), PATCH, generator=generator),
        "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids]),
    }


def _pick(batch, rows):
    """Rows ``rows`` of a batch from ``_same_length_prompts`` (pixels and grids with them)."""
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return {
        "input_ids": batch["input_ids"][rows], "mm_token_type_ids": batch["mm_token_type_ids"][rows],
        "pixel_values": torch.cat([batch["pixel_values"][starts[r] : starts[r] + sizes[r]] for r in rows]),
        "image_grid_thw": batch["image_grid_thw"][rows],
    }


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_steps_with_one_rope_deltas_row_per_prompt_equal_each_prompt_alone(name):
    """Two prompts whose images have different grids (so different M-RoPE deltas), each repeated
    twice as ``generate`` repeats a prompt for beams or several sequences, prefilled under a reducer;
    ``rope_deltas`` holds one row per prompt (the deltas of the prompts before their repetition),
    and the steps carry neither a mask nor positions. Each row's step positions and logits equal its
    prompt's alone. Fails if the deltas are tiled (``repeat``) instead of each prompt's row repeated
    for its copies (``repeat_interleave``)."""
    from models import make_qwen

    model = make_qwen(name)
    prompts = _same_length_prompts(model, [(8, 8), (16, 4)], seed=7)
    copies = [0, 0, 1, 1]

    def steps(inputs, deltas_rows):
        probe = []
        reducer = duet_vlm.make("visionzip", ratio=0.5)
        with torch.no_grad(), reducer(model):
            handle = model.model.language_model.register_forward_pre_hook(
                lambda m, a, k: probe.append(k["position_ids"]), with_kwargs=True
            )
            try:
                out = model(**inputs, use_cache=True)
                if deltas_rows is not None:
                    model.model.rope_deltas = model.model.rope_deltas[deltas_rows]
                token = torch.full((inputs["input_ids"].shape[0], 1), 17)
                logits = []
                for _ in range(2):
                    out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                    logits.append(out.logits[:, -1])
            finally:
                handle.remove()
        return probe[1:], logits

    batch_positions, batch_logits = steps(_pick(prompts, copies), [0, 2])
    for row, prompt in enumerate(copies):
        alone_positions, alone_logits = steps(_pick(prompts, [prompt]), None)
        for step in range(2):
            assert torch.equal(batch_positions[step][:, row], alone_positions[step][:, 0]), (row, step)
            torch.testing.assert_close(batch_logits[step][row], alone_logits[step][0], rtol=1e-5, atol=1e-5)

