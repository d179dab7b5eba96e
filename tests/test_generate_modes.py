"""Every method through the generation modes of ``generate`` on the tiny LLaVA-1.5 model.

Beam search and several sampled sequences repeat each row after the image was encoded once:
a batch of two equal prompts must give each row what one prompt gives. Continuing a cached
conversation works for language-side methods; after a vision-side reduction the cache is shorter
than the prompt, generate() resends part of it, and the error says what to do instead.
(Assisted decoding is not covered yet.)
"""

import pytest
import torch

import duet_vlm

from conftest import make_inputs, make_llava

NAMES = [name for name in sorted(duet_vlm.METHODS) if name != "full"]


@pytest.fixture(scope="module")
def model():
    return make_llava(layers=8, seed=2)


def _twice(inputs):
    return {k: torch.cat([v, v]) for k, v in inputs.items()}


@pytest.mark.parametrize("name", NAMES)
def test_beam_search_rows_equal_one_prompt(model, name):
    inputs = make_inputs(model, seed=1)
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad(), duet_vlm.make(name, ratio=0.25)(model):
        one = model.generate(**inputs, **kwargs)
        two = model.generate(**_twice(inputs), **kwargs)
    assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[0])


@pytest.mark.parametrize("name", NAMES)
def test_several_sampled_sequences_equal_repeated_rows(model, name):
    inputs = make_inputs(model, seed=2)
    kwargs = dict(max_new_tokens=4, do_sample=True, top_k=0)
    with torch.no_grad(), duet_vlm.make(name, ratio=0.25)(model):
        torch.manual_seed(0)
        several = model.generate(**inputs, num_return_sequences=2, **kwargs)
        torch.manual_seed(0)
        repeated = model.generate(**_twice(inputs), **kwargs)
    assert torch.equal(several, repeated)


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
