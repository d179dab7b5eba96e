"""The model card (``README.md``) of an exported demo model: architecture, the recipe (from the
saved ``DemoConfig``), its reproduce command and the accuracies in ``metrics.json`` (computed by
``duet_vlm.demo.evaluate``).

>>> write_model_card("runs/demo/final")                                   # doctest: +SKIP
PosixPath('runs/demo/final/README.md')
"""

from __future__ import annotations

import json
from pathlib import Path


def _recipe_lines(h: dict, metrics: dict) -> list[str]:
    if "full_share" not in h:
        return ["- trained by an earlier version of the recipe (see the hyper-parameters)"]
    if h.get("architecture", "llava") != "llava":
        return _qwen_recipe_lines(h, metrics)
    shares = {"all 576 patches": h["full_share"], f"random {h['random_min']}-{h['random_max']} patches": h["random_share"],
              "2x2-pooled grid (144)": h["pool2_share"], "3x3-pooled grid (64)": h["pool3_share"]}
    total = sum(shares.values()) or 1.0
    mix = ", ".join(f"{name} {100 * share / total:.0f}%" for name, share in shares.items() if share)
    lines = [
        f"- {metrics.get('vision_steps', h['vision_steps'])} vision-only steps of {h['batch_size']} images on the vision "
        "tower and projector with training-only auxiliary heads (not shipped): the colour, shape and character under "
        "each patch, each patch's row and column"
        + (" (also regressed as two numbers)" if h.get("position_regression") else "")
        + ", and from the CLS token which colours, shapes and characters the scene holds (so that CLS attention "
        "lands on the objects, as in a real CLIP)"
        + ("; word alignment: read through the decoder's final norm and `lm_head`, each object patch names its "
           "colour, shape, character and quadrant" if h.get("align_words") else ""),
        f"- then {metrics.get('steps', h['steps'])} visual-QA steps of {h['batch_size']} images x {h['n_questions']} "
        f"independent questions packed behind one image prefix (~{metrics.get('qa_pairs_seen_approx')} QA pairs); loss "
        f"on answer tokens plus the auxiliary losses (weight {h['aux_weight']})"
        + (f"; scene sizes capped by step `{h['scene_curriculum']}`" if h.get("scene_curriculum") else "")
        + ("; each image's questions shared equally among the question types its scene admits"
           if h.get("balanced_questions") else ""),
        f"- method-neutral visual subsets in the visual-QA steps: {mix}. Pooled cells average the pre-projector "
        "features of their window. In reduced steps "
        f"{100 * h['renumber_share']:.0f}% of the images get contiguous renumbered positions "
        f"({100 * h['shuffle_share']:.0f}% of those also in a random order), the rest keep the original position ids. "
        "Questions a random subset made unanswerable (an object it is about lost every patch) leave the loss. No "
        "subset is ever chosen by CLS or text attention.",
    ]
    if h.get("ground_from", -1) >= 0 and h.get("ground_weight", 0) > 0:
        heads = h.get("ground_heads", 4)
        lines.append(
            f"- grounding loss (weight {h['ground_weight']}), from decoder layer {h['ground_from']} on: head 0 learns to "
            "attend from each answer position to the visual tokens of the object(s) the question names"
            + (", head 1 to a relation's first object" if heads > 1 else "")
            + (", head 2 to spread its attention over the counted objects and `<s>`" if heads > 2 else "")
            + (", head 3 to the second object of a relation" if heads > 3 else "")
            + " (training only: the shipped weights are a plain LLaVA)")
    return lines


def _qwen_recipe_lines(h: dict, metrics: dict) -> list[str]:
    """The recipe as the Qwen2.5-VL demo model ran it: 144 merged tokens, no CLS, positions kept."""
    low, high = round(h["random_min"] / 4), round(h["random_max"] / 4)
    shares = {"all 144 tokens": h["full_share"], f"random {low}-{high} tokens": h["random_share"],
              "2x2-pooled grid (36)": h["pool2_share"], "3x3-pooled grid (16)": h["pool3_share"]}
    total = sum(shares.values()) or 1.0
    mix = ", ".join(f"{name} {100 * share / total:.0f}%" for name, share in shares.items() if share)
    lines = [
        f"- {metrics.get('vision_steps', h['vision_steps'])} vision-only steps of {h['batch_size']} images on the vision "
        "tower and merger with training-only auxiliary heads (not shipped): the colour, shape and character under "
        "each merged token (its 2x2 patches' most frequent), each token's row and column"
        + (" (also regressed as two numbers)" if h.get("position_regression") else "")
        + ", and from the mean of an image's tokens which colours, shapes and characters the scene holds (the tower "
        "has no CLS token)"
        + ("; word alignment: read through the decoder's final norm and `lm_head`, each object token names its "
           "colour, shape, character and quadrant" if h.get("align_words") else ""),
        f"- then {metrics.get('steps', h['steps'])} visual-QA steps of {h['batch_size']} images x {h['n_questions']} "
        f"independent questions packed behind one image prefix (~{metrics.get('qa_pairs_seen_approx')} QA pairs); loss "
        f"on answer tokens plus the auxiliary losses (weight {h['aux_weight']})"
        + (f"; scene sizes capped by step `{h['scene_curriculum']}`" if h.get("scene_curriculum") else "")
        + ("; each image's questions shared equally among the question types its scene admits"
           if h.get("balanced_questions") else ""),
        f"- method-neutral visual subsets in the visual-QA steps: {mix}. Pooled cells average the merged tokens "
        "of their window. Every kept token keeps its M-RoPE position (time, row, column), as under every method "
        "on this architecture. Questions a random subset made unanswerable (an object it is about lost every "
        "token) leave the loss. No subset is ever chosen by attention.",
    ]
    if h.get("ground_from", -1) >= 0 and h.get("ground_weight", 0) > 0:
        lines.append(f"- grounding loss (weight {h['ground_weight']}) from decoder layer {h['ground_from']} on, on "
                     f"{h.get('ground_heads', 4)} heads per layer, as the first demo model's (training only: the "
                     "shipped weights are a plain Qwen2.5-VL)")
    return lines


def _architecture_lines(cfg) -> list[str]:
    v, t = cfg.vision_config, cfg.text_config
    if cfg.model_type == "llava":
        return [
            f"- vision tower: CLIP, {v.image_size} px / patch {v.patch_size} -> {(v.image_size // v.patch_size) ** 2} patches + CLS, "
            f"{v.num_hidden_layers} layers, hidden {v.hidden_size}",
            f"- `vision_feature_layer={cfg.vision_feature_layer}`, `vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}`, "
            f"2-layer {cfg.projector_hidden_act} projector",
            f"- language model: Llama, {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} heads, "
            f"vocab {t.vocab_size} (word level)",
            f"- `image_token_id={cfg.image_token_id}`; the processor expands `<image>` into {cfg.image_seq_length} tokens",
        ]
    return [
        f"- vision tower: Qwen2.5-VL's, patch {v.patch_size}, no CLS token, {v.depth} blocks of hidden {v.hidden_size} "
        f"(windows of {v.window_size} px, full attention in blocks {v.fullatt_block_indexes}), 2-D RoPE",
        f"- merger (the projector): {v.spatial_merge_size}x{v.spatial_merge_size} patches -> one token of width "
        f"{v.out_hidden_size}; a 336x336 image gives 144 tokens",
        f"- language model: Qwen2, {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} heads, "
        f"M-RoPE sections {t.rope_parameters['mrope_section']}, vocab {t.vocab_size} (word level)",
        f"- `image_token_id={cfg.image_token_id}`; the processor expands `<|image_pad|>` (between `<|vision_start|>` and "
        "`<|vision_end|>`) into one token per merged 2x2 group",
    ]


def write_model_card(export_dir) -> Path:
    """Write ``README.md`` next to an exported demo model (its ``config.json`` and ``metrics.json``)."""
    from transformers import AutoConfig

    export_dir = Path(export_dir)
    cfg = AutoConfig.from_pretrained(export_dir)
    metrics_path = export_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if cfg.model_type == "llava":
        title, kind, cls, like = "LLaVA", "LLaVA-1.5", "LlavaForConditionalGeneration", "llava-hf"
    else:
        title, kind, cls, like = "Qwen2.5-VL", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL"
    lines = [
        f"# duet-vlm demo {title} model",
        "",
        f"A tiny {kind}-architecture model (`{cls}`) trained from scratch on the",
        f"offline synthetic visual-QA benchmark of `duet_vlm.synthetic`. Load it like any {like} checkpoint:",
        "",
        "```python",
        f"from transformers import AutoProcessor, {cls}",
        f"model = {cls}.from_pretrained(path)",
        "processor = AutoProcessor.from_pretrained(path)",
        "```",
        *([] if cfg.model_type == "llava" else [
            "",
            "`AutoProcessor` builds Qwen's video processor, which needs torchvision; without it (a CPU install of",
            "torch), `duet_vlm.compare.load_processor(path)` builds the same processor for images only."]),
        "",
        "## Architecture",
        *_architecture_lines(cfg),
    ]
    if metrics.get("parameters"):
        lines.append(f"- parameters: {metrics['parameters']}")
    if metrics.get("hparams"):
        lines += ["", "## Training", *_recipe_lines(metrics["hparams"], metrics),
                  f"- hyper-parameters: `{json.dumps(metrics['hparams'])}`",
                  *([f"- training wall-clock: {metrics['training_seconds'] / 3600:.2f} h (summed over resumed runs, "
                     "final evaluation excluded)"] if "training_seconds" in metrics else []),
                  "- reproduce (seeded; re-running the command resumes it):", "", "```bash",
                  metrics.get("command", "duet-vlm train-demo"), "```"]
    every = "all 576 visual tokens" if cfg.model_type == "llava" else "all 144 visual tokens"
    for key, title in (("test", every), ("test_blank_image", "blank (grey) image control")):
        if key in metrics:
            r = metrics[key]
            lines += ["", f"## Test accuracy, {title} (n={r['n']})", "", "| type | accuracy | chance |", "|---|---|---|",
                      f"| **overall** | **{r['accuracy']:.3f}** | |"]
            lines += [f"| {q} | {a:.3f} | {r['chance'][q]:.3f} |" for q, a in r["per_type"].items()]
    if "patch_word_probe" in metrics:
        probe = metrics["patch_word_probe"]
        lines += ["", "## Perception probe (`patch_word_probe`)",
                  "Share of object patches of fresh scenes that, read through the decoder's final norm and "
                  "`lm_head`, name their object's colour / shape / character: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in probe.items())]
    path = export_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
