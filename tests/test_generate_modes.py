"""Every method through the generation modes of ``generate`` on the tiny LLaVA-1.5 model.

Beam search and several sampled sequences repeat each row after the image was encoded once:
a batch of two equal prompts must give each row what one prompt gives. Continuing a cached
conversation works for methods that prune only inside the language model; after any vision-side
reduction (DUET's Stage A included) the cache is shorter
than the prompt, generate() resends part of it, and the error says what to do instead. Assisted
decoding puts the first drafts into the prefill: it equals greedy decoding under vision-side
methods and is refused under methods that prune inside the language model (the drafts would
steer what they keep).
"""

import re

import pytest
import torch

import duet_vlm
from duet_vlm.compat import cache_of

from checks import hook_ids, release_needed, twice
from models import BUDGETED, FAMILIES, make_inputs, make_llava

NAMES = [name for name in BUDGETED if name != "full"]  # pixelprune: tests/test_pixelprune.py
# ``model``: tests/conftest.py's 8-layer tiny LLaVA-1.5 (seed 2), built once for this module.


@pytest.fixture(scope="module")
def rejected_draft():
    """A draft that always proposes token 998, which the main model never generates here: every
    draft is rejected and cropped from the cache."""
    model = make_llava(layers=2, seed=3)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[998] = 1.0
        model.model.language_model.norm.weight.fill_(1.0)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_beam_search_rows_equal_one_prompt(model, name):
    inputs = make_inputs(model, seed=1)
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad(), duet_vlm.make(name, ratio=0.25)(model):
        one = model.generate(**inputs, **kwargs)
        two = model.generate(**twice(inputs), **kwargs)
    assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[0])


@pytest.mark.parametrize("name", NAMES)
def test_several_sampled_sequences_equal_repeated_rows(model, name):
    inputs = make_inputs(model, seed=2)
    kwargs = dict(max_new_tokens=4, do_sample=True, top_k=0)
    with torch.no_grad(), duet_vlm.make(name, ratio=0.25)(model):
        torch.manual_seed(0)
        several = model.generate(**inputs, num_return_sequences=2, **kwargs)
        torch.manual_seed(0)
        repeated = model.generate(**twice(inputs), **kwargs)
    assert torch.equal(several, repeated)


@pytest.mark.parametrize("name", ["visionzip", "pool", "random"])
def test_assisted_decoding_after_a_vision_side_method_equals_greedy(model, rejected_draft, name):
    inputs = make_inputs(model, seed=3)
    with torch.no_grad(), duet_vlm.make(name, ratio=0.25)(model):
        greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assisted = model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_model=rejected_draft)
    assert torch.equal(greedy, assisted)


@pytest.mark.parametrize("name", ["duet", "fastv", "pyramiddrop", "sparsevlm", "pio"])
def test_assisted_decoding_under_in_llm_pruning_is_refused(model, rejected_draft, name):
    """The first drafts join the prefill and steer what Stage B keeps: refused, naming what works."""
    inputs = make_inputs(model, seed=3)
    with torch.no_grad(), duet_vlm.make(name, ratio=0.25)(model):
        with pytest.raises(NotImplementedError, match="Use greedy, sampling or beam search, or a method that reduces only before the language model"):
            model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_model=rejected_draft)


@pytest.mark.parametrize("name", ["visionzip", "full"])
def test_assisted_decoding_of_a_left_padded_gemma_prompt_equals_greedy(name):
    """Gemma 3's base model hands its language model one mask per layer type, not the 2-D mask, and
    a left-padded row's positions start after its padding: only the base model's 2-D mask (as wide
    as the unreduced cache plus the chunk) tells a drafted chunk from a resent prompt there. Assisted
    decoding of one left-padded row (a draft with the model's own weights) gives greedy decoding's
    tokens under a vision-side method and under ``full``. Catches a check that reads the language
    model's mask only (the half of an earlier fix): the positions, 16 short of the mask's width,
    read as a resent prompt and every drafted chunk was refused ("pass the whole conversation
    again without past_key_values")."""
    family = FAMILIES["gemma3"]
    model, draft = family.model(), family.build()
    batch = family.batch(model)
    inputs = {key: batch[key][:1] for key in ("input_ids", "attention_mask", "token_type_ids")}
    inputs["pixel_values"] = batch["pixel_values"][:1]  # row 0 holds one image
    assert not inputs["attention_mask"][0, 0], "the premise: the row is left-padded"
    chunks = []  # (cached tokens, new tokens) of each language-model forward on a cache
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: chunks.append((cache_of(kw).get_seq_length(), kw["inputs_embeds"].shape[1])),
        with_kwargs=True)
    reducer = duet_vlm.make(name, ratio=0.5) if name != "full" else duet_vlm.make("full")
    try:
        with torch.no_grad(), reducer(model):
            greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            chunks.clear()
            assisted = model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_model=draft)
    finally:
        handle.remove()
    assert any(cached > 0 and new > 1 for cached, new in chunks), "the premise: drafted chunks ran on the cache"
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("name", NAMES)
def test_a_second_turn_on_the_cache(model, name):
    inputs = make_inputs(model, seed=4)
    reducer = duet_vlm.make(name, ratio=0.25)
    with torch.no_grad(), reducer(model):
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        follow_up = torch.cat([first.sequences, torch.tensor([[11, 12, 13]])], dim=1)
        turn = dict(input_ids=follow_up, attention_mask=torch.ones_like(follow_up), past_key_values=first.past_key_values)
        if reducer.stats.llm_input_tokens < 576:  # a vision stage shortened the cache below the prompt
            with pytest.raises(NotImplementedError, match="pass the whole conversation again without past_key_values"):
                model.generate(**turn, max_new_tokens=2, do_sample=False)
        else:
            second = model.generate(**turn, max_new_tokens=2, do_sample=False)
            assert second.shape[1] == follow_up.shape[1] + 2


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_a_static_cache_runs_under_full_exactly(family_name):
    """Nothing reduced: ``full`` is the unpatched model, bit for bit, under a static cache too,
    on every family, one row and a padded batch (the same tokens and logits at every step), and its
    statistics count every item whole. generate builds the layers' masks itself there (4-D, or one
    per layer type), so the prefill is left to the model (``prefill.WholeItems``); before, every
    family but LLaVA-1.5's, and any padded batch, failed on the mask (found by ``duet-vlm check``).
    A family the installed transformers is too old for (``compat.FAMILY_NEEDS``) is refused at
    attach, naming the release it needs, and the model is left as it was."""
    family = FAMILIES[family_name]
    model = family.model()
    needed = release_needed(model)
    if needed is not None:
        hooks = hook_ids(model)
        with pytest.raises(TypeError, match=f"transformers {re.escape(needed)} or newer"):
            duet_vlm.make("full").attach(model)
        assert hook_ids(model) == hooks
        return
    batch = family.batch(model)
    kwargs = dict(max_new_tokens=3, do_sample=False, cache_implementation="static", output_logits=True,
                  return_dict_in_generate=True)
    for inputs in (family.row(batch, 0), batch):
        reducer = duet_vlm.make("full")
        with torch.no_grad():
            plain = model.generate(**inputs, **kwargs)
            with reducer(model):
                out = model.generate(**inputs, **kwargs)
        assert torch.equal(out.sequences, plain.sequences)
        assert torch.equal(torch.stack(out.logits), torch.stack(plain.logits))
        assert reducer.stats.items and all(item.tokens_per_layer == [item.tokens] * len(item.tokens_per_layer)
                                           for item in reducer.stats.items)


@pytest.mark.parametrize("name", ["visionzip", "duet"])
def test_stats_read_after_generate_equal_those_read_at_the_prefills_exit(model, rejected_draft, name):
    """``reducer.stats`` are computed when read, from what the prefill's exit recorded: the decoding
    steps after it (assisted decoding crops the prompt's tokens under a vision-side method) change
    nothing in them. Read once inside the generate, right after the prefill's exit, and once after it."""
    inputs = make_inputs(model, seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    if name == "visionzip":
        kwargs["assistant_model"] = rejected_draft
    reducer = duet_vlm.make(name, ratio=0.25)
    read = []

    def at_exit(module, args, output):
        if not read:
            read.append(reducer.stats)

    with torch.no_grad(), reducer(model):
        handle = model.model.language_model.register_forward_hook(at_exit)  # after the runtime's exit hook
        try:
            model.generate(**inputs, **kwargs)
        finally:
            handle.remove()
        model.generate(**inputs, **kwargs)
        later = reducer.stats
    assert later is not read[0]
    early = read[0]
    for field in ("tokens_per_layer", "visual_tokens", "llm_input_tokens", "text_tokens", "flops_exact", "kv_bytes"):
        assert getattr(later, field) == getattr(early, field), field
    for a, b in zip(later.items, early.items):
        assert torch.equal(a.kept_ids, b.kept_ids) and torch.equal(a.entry_slots, b.entry_slots)
        assert [(layer, ids.tolist()) for layer, ids in a.stage_ids] == [(layer, ids.tolist()) for layer, ids in b.stage_ids]
