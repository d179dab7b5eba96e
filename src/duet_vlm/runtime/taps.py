"""Encoder taps: what each vision tower's feature layer saw, per tower call, for the call that owns it.

A tower's feature layer keeps its input (the scores and keys are computed from it with the layer's
own projections, so the tower keeps its attention backend) and its output (the pre-projector
features). The arguments of the tower's entry module are kept too (Qwen-VL's ``grid_thw``), and
each capture remembers, weakly, the output object its tower call returned: ``generate`` encodes the
images before the prefill and hands the model exactly those objects (``mm_encoder_outputs``), so
the prefill keeps the captures of its own encoding and nothing a failed or interrupted call left
behind. Without a cache ``generate`` prefills again at every step from the same encoding, so
captures stay until the next encoding.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ..adapters import Capture


@dataclass
class TowerCaptures:
    """The captures of one call's current encoding, per tower (one ``Capture`` per tower call)."""

    calls: dict[str, list[Capture]] = field(default_factory=dict)
    used: bool = False  # taken by a prefill: the next tower call starts a new encoding
    pending_inputs: dict[str, tuple[torch.Tensor, dict]] = field(default_factory=dict)
    pending_entries: dict[str, dict] = field(default_factory=dict)
    open: dict[str, list[Capture]] = field(default_factory=dict)  # made by a tower call still running
    pending_layers: dict[str, dict] = field(default_factory=dict)  # other encoder layers' inputs, per tower
    #: per tower, what its last patch-subset call let in, until the module after it (LLaVA's projector)
    #: takes it: ``(entered, False)``, then ``(entered, True)`` while that module runs on the entered rows.
    after_tower: dict[str, tuple] = field(default_factory=dict)

    def clear(self) -> None:
        self.calls, self.used = {}, False
        self.pending_inputs, self.pending_entries, self.open, self.pending_layers = {}, {}, {}, {}
        self.after_tower = {}

    def enter_tower(self, tower: str, args: tuple, kwargs: dict) -> None:
        self.pending_entries[tower] = {"entry_args": args, "entry_kwargs": kwargs}
        self.open[tower] = []

    def note_entered(self, tower: str, entered: torch.Tensor) -> None:
        """The running tower call encodes only the tokens ``entered`` (an input stage chose them):
        kept with its capture (``context["entered"]``)."""
        self.pending_entries[tower]["entered"] = entered

    def entered(self, tower: str, running: bool = False, done: bool = False) -> torch.Tensor | None:
        """The tokens the running call of ``tower`` lets in; ``running``: ``None`` when no call that
        an input stage chose for is running (a module inside the tower called on its own);
        ``done``: the call ends, and forgets them (its captures keep them)."""
        entry = self.pending_entries.get(tower, {})
        if running:
            return entry.get("entered")
        return entry.pop("entered") if done else entry["entered"]

    def leave_tower(self, tower: str, output) -> None:
        """The tower call returned ``output``: its captures are that output's."""
        for capture in self.open.pop(tower, []):
            capture.source = weakref.ref(output)

    def keep_input(self, tower: str, args: tuple, kwargs: dict) -> None:
        self.pending_inputs[tower] = (args[0] if args else kwargs["hidden_states"], kwargs)

    def keep_layer_input(self, tower: str, layer, args: tuple, kwargs: dict) -> None:
        """The input of another encoder layer a vision stage reads (``VisionStage.encoder_layers``):
        kept with the capture of the same tower call, which may come before or after it."""
        entry = (args[0] if args else kwargs["hidden_states"], kwargs)
        captured = self.open.get(tower)
        if captured:  # the feature layer of this tower call ran already
            captured[-1].contexts[0].setdefault("layers", {})[layer] = entry
        else:
            self.pending_layers.setdefault(tower, {})[layer] = entry

    def keep_output(self, tower: str, output) -> None:
        features = output[0] if isinstance(output, tuple) else output
        if self.used:  # the first tower call of a new encoding: earlier captures are stale
            self.calls, self.used = {}, False
        layer_input, layer_kwargs = self.pending_inputs.pop(tower)
        context = {"layer_kwargs": layer_kwargs, **self.pending_entries.get(tower, {})}
        context["layers"] = self.pending_layers.pop(tower, {})
        capture = Capture(layer_input, features, contexts=(context,))
        self.calls.setdefault(tower, []).append(capture)
        self.open.setdefault(tower, []).append(capture)

    def keep_only(self, outputs) -> None:
        """Keep the captures of the tower calls that returned one of ``outputs`` (the encoder
        outputs a ``generate`` prefill receives), in their order; drop everything else."""
        wanted = [output for output in outputs if output is not None]
        kept = {}
        for tower, captures in self.calls.items():
            mine = [c for c in captures if c.source is not None and any(c.source() is output for output in wanted)]
            if mine:
                kept[tower] = mine
        self.calls, self.used = kept, False
        self.pending_inputs, self.pending_entries, self.open, self.pending_layers = {}, {}, {}, {}

    def encoding(self) -> tuple:
        """Which tower calls produced the current captures: weak references to their outputs
        (compared with ``same_encoding``; an id alone could be reused once an output is freed)."""
        return tuple(c.source for captures in self.calls.values() for c in captures)

    def take(self) -> dict[str, Capture]:
        """Every tower's captures of the current encoding, concatenated over its calls (one row per
        unit). They stay until a tower runs again: ``generate()`` without a cache encodes the images
        once and prefills at every step."""
        self.used = True
        return {
            tower: Capture(
                torch.cat([c.layer_input for c in calls]),
                torch.cat([c.output for c in calls]),
                tuple(c.output.shape[0] for c in calls),
                tuple(context for c in calls for context in c.contexts),
            )
            for tower, calls in self.calls.items()
        }


def same_encoding(a: tuple, b: tuple) -> bool:
    """Whether two encodings are the same tower calls, by the identity of outputs still alive."""
    return len(a) == len(b) and all(
        x is not None and y is not None and x() is not None and x() is y() for x, y in zip(a, b)
    )
