"""Per-call state: what a call on the model computes belongs to that call, not to the attachment.

A *call* is what one thread does with the model: a forward, or a ``generate`` (its encoding, its
prefill and the decoding steps that read the prefill's bookkeeping). Hooks receive no call
context, so each thread has its own ``Call`` (``threading.local``): many threads may call one
model with one attached reducer, each sees only its own state, and each gets what it would get
alone. A call that fails leaves nothing behind that the next one reads: a forward that raised (or
was interrupted) never reached its end, which the thread's next forward notices, and a prefill
keeps only the captures of its own encoding (``taps``).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from .sharded import KeptUnsharded
from .state import PrefillState
from .taps import TowerCaptures


@dataclass
class Call:
    """One thread's state on one attached model."""

    captures: TowerCaptures = field(default_factory=TowerCaptures)
    labels: torch.Tensor | None = None  # the top model's labels, read at the language model's entry
    found: tuple[torch.Tensor, dict] | None = None  # the base model's (input_ids, kwargs), until that entry
    prompt: PrefillState | None = None  # the last prefill's state, for the decoding steps after it
    head_rows: torch.Tensor | None = None  # where the last prefill's states sit, for the LM head
    in_stage: bool = False  # a stage is running a layer itself: the hooks stand aside
    forwards: int = 0  # base-model forwards in progress in this thread
    logits_to_keep: object = None  # the top model's argument: > 1 in a prefill means drafted tokens
    hidden_states_asked: bool = False  # output_hidden_states: warned about at a prefill that reduces
    # The first prefill without a cache of the current encoding, and which encoding: generate()
    # without a cache prefills again at every step and keeps that prefill's selection.
    reference: PrefillState | None = None
    reference_encoding: tuple = ()
    # FSDP2 layers this forward reads after their own forward, kept unsharded until it has.
    kept: KeptUnsharded = field(default_factory=KeptUnsharded)

    def forget(self) -> None:
        """Drop what the last call left (its prompt, labels, inputs); captures are sorted out by the
        next forward, which knows which encoding is its own."""
        self.labels = self.found = self.prompt = self.head_rows = self.reference = None
        self.in_stage = False
        self.forwards = 0
        self.kept.release()


def _in_backward() -> bool:
    """Whether autograd is running a backward pass (where checkpointed layers are recomputed)."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


class CallStore:
    """The ``Call`` of each thread, for one attachment."""

    def __init__(self) -> None:
        self._local = threading.local()
        # Gradient checkpointing recomputes decoder layers during the backward pass, which autograd
        # may run on another thread (one per CUDA device): the layer hooks there need the prefill
        # that ran with gradients.
        self._grad_call: weakref.ref[Call] | None = None

    def current(self) -> Call:
        call = getattr(self._local, "call", None)
        if call is None:
            call = self._local.call = Call()
        return call

    def for_layers(self) -> Call:
        """The call a decoder layer's hook serves: this thread's, or, in a backward pass on a
        thread that made no prefill, the last prefill that ran with gradients."""
        call = self.current()
        if call.prompt is None and self._grad_call is not None and _in_backward():
            return self._grad_call() or call
        return call

    def remember_grad_call(self, call: Call) -> None:
        self._grad_call = weakref.ref(call) if torch.is_grad_enabled() else self._grad_call

