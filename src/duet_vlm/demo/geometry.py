"""What the demo recipe does differently on each architecture it trains: ``Geometry``.

The recipe (``train``, ``batching``, ``objectives``) is one; an architecture says how an image
enters (its pixel layout, its visual tokens and where they sit in the prompt), where the patch
features come from and what projects them, what stands for a CLS token in the scene objective, how
patch-level targets become token-level ones, and what positions the decoder takes.

- ``LLAVA`` (the first demo model): 576 visual tokens, one per patch; the CLS token of the feature
  layer; 1-D positions.
- ``QWEN2_5_VL`` (the second): 144 visual tokens, one per 2x2 patch group, out of the merger; no CLS
  token, so the scene objective reads the mean of an image's tokens; M-RoPE positions (time, row,
  column) computed from the 1-D packed positions exactly as ``get_rope_index`` numbers a prompt.

>>> QWEN2_5_VL.grid, QWEN2_5_VL.n_tokens, LLAVA.n_tokens
(12, 144, 576)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import synthetic

ARCHITECTURES = ("llava", "qwen2_5_vl")


@dataclass(frozen=True)
class Geometry:
    """How one architecture meets the recipe (``LlavaGeometry``, ``QwenGeometry``). ``grid``: visual
    tokens per side; ``merge``: patches per token side (a token stands for ``merge x merge`` patches)."""

    architecture: str
    grid: int
    merge: int

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    # what each architecture says -------------------------------------------------------------

    def build(self, tokenizer, overrides: dict, seed: int):
        """The model, from ``tokenizer``, the ``DEFAULTS`` ``overrides`` and the initialisation ``seed``."""
        raise NotImplementedError

    def processor(self, folder):
        """The architecture's processor (one that is read from files is written into ``folder`` first)."""
        raise NotImplementedError

    def save_processor(self, processor, folder) -> None:
        raise NotImplementedError

    def count_parameters(self, model) -> dict[str, int]:
        raise NotImplementedError

    def is_projector(self, name: str) -> bool:
        """Whether parameter ``name`` (of the recipe's ``DemoModel``) belongs to the projector."""
        raise NotImplementedError

    def prefix(self, tokenizer, image_token_id: int, encode) -> list[int]:
        """The prompt's tokens up to the end of the image."""
        raise NotImplementedError

    def image_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's image inputs from ``(B, 3, 336, 336)`` normalised images (as its processor gives them)."""
        raise NotImplementedError

    def features(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(visual features before the projector (B, n, H), the scene objective's input (B, H'))``."""
        raise NotImplementedError

    def projector(self, model) -> nn.Module:
        """What turns ``features`` into decoder inputs."""
        raise NotImplementedError

    def scene_width(self, config) -> int:
        """The width of the scene objective's input."""
        raise NotImplementedError

    def positions(self, positions: torch.Tensor, first: int) -> torch.Tensor:
        """The decoder's position ids from the recipe's 1-D ones ``(B, L)`` (``first``: where the image's
        tokens begin, the positions ``first .. first + n`` theirs)."""
        raise NotImplementedError

    # shared ----------------------------------------------------------------------------------

    def token_targets(self, targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Patch-level targets (``(..., 576)``) as token-level ones (``(..., n)``): a token's colour, shape
        and character are its patches' most frequent (ties: the smallest id); it is a grounding target
        where any of its patches is; a required group's where any of its patches is (the largest id where
        two objects share it: a group keeps its other tokens)."""
        if self.merge == 1:
            return targets
        m, g = self.merge, self.grid

        def groups(a: np.ndarray) -> np.ndarray:  # (..., 576) -> (..., n, m * m)
            lead = a.shape[:-1]
            return a.reshape(*lead, g, m, g, m).swapaxes(-3, -2).reshape(*lead, g * g, m * m)

        out = dict(targets)
        for key in ("color", "shape", "char"):
            if key in targets:
                members = groups(targets[key])
                counts = np.stack([(members == c).sum(-1) for c in range(int(targets[key].max(initial=0)) + 1)], -1)
                counts[..., 0] = 0
                out[key] = np.where(counts.max(-1) > 0, counts.argmax(-1), 0).astype(targets[key].dtype)
        if "ground_target" in targets:
            out["ground_target"] = groups(targets["ground_target"]).any(-1)
        if "required" in targets:
            out["required"] = groups(targets["required"]).max(-1)
        return out


@dataclass(frozen=True)
class LlavaGeometry(Geometry):
    """LLaVA-1.5's: a CLIP tower with a CLS token, one token per patch, a projector, 1-D positions."""

    def build(self, tokenizer, overrides: dict, seed: int):
        from .model import build_model, demo_config

        return build_model(demo_config(tokenizer, **overrides), seed=seed)

    def processor(self, folder):
        from .processor import build_processor

        return build_processor()

    def save_processor(self, processor, folder) -> None:
        processor.save_pretrained(folder)

    def count_parameters(self, model) -> dict[str, int]:
        from .model import count_parameters

        return count_parameters(model)

    def is_projector(self, name: str) -> bool:
        return "multi_modal_projector" in name

    def prefix(self, tokenizer, image_token_id: int, encode) -> list[int]:
        """``<s> USER: <image>*576``."""
        return [tokenizer.bos_token_id] + encode(tokenizer, "USER:") + [image_token_id] * self.n_tokens

    def image_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixels}

    def features(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The patches and the CLS token of the feature layer."""
        out = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
        hidden = out.hidden_states[model.config.vision_feature_layer]
        return hidden[:, 1:], hidden[:, 0]

    def projector(self, model) -> nn.Module:
        return model.model.multi_modal_projector

    def scene_width(self, config) -> int:
        return config.vision_config.hidden_size

    def positions(self, positions: torch.Tensor, first: int) -> torch.Tensor:
        return positions


@dataclass(frozen=True)
class QwenGeometry(Geometry):
    """Qwen2.5-VL's: no CLS token, a 2x2 merger that is the projector, M-RoPE positions."""

    def build(self, tokenizer, overrides: dict, seed: int):
        from .qwen import build_qwen_model, qwen_demo_config

        return build_qwen_model(qwen_demo_config(tokenizer, **overrides), seed=seed)

    def processor(self, folder):
        from .qwen import load_qwen_processor, write_qwen_processor

        return load_qwen_processor(write_qwen_processor(folder))

    def save_processor(self, processor, folder) -> None:
        from .qwen import write_qwen_processor

        write_qwen_processor(folder)

    def count_parameters(self, model) -> dict[str, int]:
        from .qwen import count_qwen_parameters

        return count_qwen_parameters(model)

    def is_projector(self, name: str) -> bool:
        return "visual.merger" in name

    def prefix(self, tokenizer, image_token_id: int, encode) -> list[int]:
        """``<s> USER: <|vision_start|> <|image_pad|>*144 <|vision_end|>``."""
        start, end = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
        head = [tokenizer.bos_token_id] + encode(tokenizer, "USER:")
        return head + [start] + [image_token_id] * self.n_tokens + [end]

    def image_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        from .qwen import patchify

        values, grid = patchify(pixels)
        return {"pixel_values": values, "image_grid_thw": grid}

    def features(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The merger's tokens (already in the decoder's space) and their mean: there is no CLS token."""
        grid = batch["image_grid_thw"]
        out = model.model.visual(batch["pixel_values"], grid_thw=grid)
        merged = getattr(out, "pooler_output", out)
        tokens = merged.reshape(grid.shape[0], self.n_tokens, -1)
        return tokens, tokens.mean(1)

    def projector(self, model) -> nn.Module:
        return nn.Identity()  # the merger already projected

    def scene_width(self, config) -> int:
        return config.text_config.hidden_size

    def positions(self, positions: torch.Tensor, first: int) -> torch.Tensor:
        """``(3, B, L)``: text ``(p, p, p)``, token ``k`` of the image ``(first, first + row, first + column)``,
        text after it continuing from ``first + grid``, as ``get_rope_index`` numbers a prompt."""
        n, g = self.n_tokens, self.grid
        k = positions - first
        image = (k >= 0) & (k < n)
        text = torch.where(k >= n, positions - n + g, positions)
        row = torch.where(image, first + k.clamp(0, n - 1) // g, text)
        column = torch.where(image, first + k.clamp(0, n - 1) % g, text)
        time = torch.where(image, torch.full_like(positions, first), text)
        return torch.stack([time, row, column])


LLAVA = LlavaGeometry("llava", synthetic.GRID, 1)
QWEN2_5_VL = QwenGeometry("qwen2_5_vl", synthetic.GRID // 2, 2)


def geometry(architecture: str) -> Geometry:
    """The ``Geometry`` of ``architecture`` (one of ``ARCHITECTURES``)."""
    try:
        return {"llava": LLAVA, "qwen2_5_vl": QWEN2_5_VL}[architecture]
    except KeyError:
        raise ValueError(f"the demo recipe trains {', '.join(ARCHITECTURES)}, not {architecture!r}") from None


def geometry_of(model) -> Geometry:
    """The ``Geometry`` of a built demo model (by its config's ``model_type``)."""
    kind = model.config.model_type
    if kind not in ARCHITECTURES:
        raise ValueError(f"not a demo model architecture: {kind!r} (the demo recipe trains {', '.join(ARCHITECTURES)})")
    return geometry(kind)
