"""What a prefill refuses or warns about before it reduces anything: the generation modes that cannot
be exact under the methods in its plans (the table of ``duet_vlm.generation_modes``)."""

from __future__ import annotations

import warnings

from ..plan import Plan, ReducedHiddenStatesWarning


def reads_text(plans: list[Plan]) -> bool:
    """Whether a vision stage of these plans conditions on the prompt's text."""
    return any(plan.vision is not None and plan.vision.needs_text for plan in plans)


def check_prefill(plans: list[Plan], call, cache) -> None:
    """Refuse drafts in a prefill that a language stage or the text would read; warn that hidden
    states come back at reduced lengths."""
    reduces = not all(plan.schedule.is_identity for plan in plans)
    # Assisted and prompt-lookup decoding verify drafted tokens in the prefill itself (generate asks
    # for the logits of every draft): the drafts would be the text a language stage reads.
    drafted = isinstance(call.logits_to_keep, int) and call.logits_to_keep > 1 and cache is not None
    if drafted and (any(plan.schedule.boundaries for plan in plans) or reads_text(plans)):
        raise NotImplementedError(
            "assisted and prompt-lookup decoding put drafted tokens into the prefill, where they would steer what "
            "a method that prunes inside the language model (or reads the prompt's text) keeps. Use greedy, "
            "sampling or beam search, or a method that reduces only before the language model without reading the "
            "prompt (duet_vlm.generation_modes lists them), under which drafts run exactly"
        )
    if call.hidden_states_asked and reduces:
        warnings.warn(
            "output_hidden_states under a duet-vlm reducer that reduces: each decoder layer's hidden states have "
            "that layer's reduced length (its kept tokens, in order); only the last hidden state is put back at "
            "the input's length (dropped positions hold zeros)",
            ReducedHiddenStatesWarning,
            stacklevel=3,
        )
