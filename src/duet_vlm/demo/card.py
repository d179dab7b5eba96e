"""The model card (``README.md``) of an exported demo model: architecture, the recipe (from the
saved ``DemoConfig``), its reproduce command and the accuracies in ``metrics.json`` (computed by
``duet_vlm.demo.evaluate``).

>>> write_model_card("runs/demo/final")                                   # doctest: +SKIP
PosixPath('runs/demo/final/README.md')
"""

from __future__ import annotations

import json
from pathlib import Path


#: How the recipe's lines name each architecture's parts: its visual tokens, what ran the vision-only
#: steps, what the scene objective reads, where pooled cells come from, how positions go.
_WORDS = {
    "llava": dict(
        tokens=576, unit="patch", units="patches", projector="projector", label_unit="each patch",
        scene="from the CLS token which colours, shapes and characters the scene holds (so that CLS attention "
              "lands on the objects, as in a real CLIP)",
        pooled="the pre-projector features", shipped="LLaVA", chosen="CLS or text attention",
        kept_positions="Every kept token keeps its position."),
    "qwen2_5_vl": dict(
        tokens=144, unit="token", units="tokens", projector="merger",
        label_unit="each merged token (its 2x2 patches' most frequent)",
        scene="from the mean of an image's tokens which colours, shapes and characters the scene holds (the tower "
              "has no CLS token)",
        pooled="the merged tokens", shipped="Qwen2.5-VL", chosen="attention",
        kept_positions="Every kept token keeps its position (M-RoPE: time, row, column), as under every method on "
                       "this architecture."),
}


def _recipe_lines(h: dict, metrics: dict) -> list[str]:
    if "full_share" not in h:
        return ["- trained by an earlier version of the recipe (see the hyper-parameters)"]
    words = _WORDS[h.get("architecture", "llava")]
    n, unit, units = words["tokens"], words["unit"], words["units"]
    scale = n / 576  # random subsets keep the same share of a model's tokens; the grid pools 2x2 and 3x3
    shares = {f"all {n} {units}": h["full_share"],
              f"random {round(h['random_min'] * scale)}-{round(h['random_max'] * scale)} {units}": h["random_share"],
              f"2x2-pooled grid ({n // 4})": h["pool2_share"], f"3x3-pooled grid ({n // 9})": h["pool3_share"]}
    total = sum(shares.values()) or 1.0
    mix = ", ".join(f"{name} {100 * share / total:.0f}%" for name, share in shares.items() if share)
    if h["renumber_share"]:
        positions = (f"In reduced steps {100 * h['renumber_share']:.0f}% of the images get contiguous renumbered positions "
                     f"({100 * h['shuffle_share']:.0f}% of those also in a random order), the rest keep the original "
                     "position ids.")
    else:
        positions = words["kept_positions"]
    lines = [
        f"- {metrics.get('vision_steps', h['vision_steps'])} vision-only steps of {h['batch_size']} images on the vision "
        f"tower and {words['projector']} with training-only auxiliary heads (not shipped): the colour, shape and "
        f"character under {words['label_unit']}, each {unit}'s row and column"
        + (" (also regressed as two numbers)" if h.get("position_regression") else "")
        + f", and {words['scene']}"
        + (f"; word alignment: read through the decoder's final norm and `lm_head`, each object {unit} names its "
           "colour, shape, character and quadrant" if h.get("align_words") else ""),
        f"- then {metrics.get('steps', h['steps'])} visual-QA steps of {h['batch_size']} images x {h['n_questions']} "
        f"independent questions packed behind one image prefix (~{metrics.get('qa_pairs_seen_approx')} QA pairs); loss "
        f"on answer tokens plus the auxiliary losses (weight {h['aux_weight']})"
        + (f"; scene sizes capped by step `{h['scene_curriculum']}`" if h.get("scene_curriculum") else "")
        + ("; each image's questions shared equally among the question types its scene admits"
           if h.get("balanced_questions") else ""),
        f"- method-neutral visual subsets in the visual-QA steps: {mix}. Pooled cells average {words['pooled']} "
        f"of their window. {positions} Questions a random subset made unanswerable (an object it is about lost every "
        f"{unit}) leave the loss. No subset is ever chosen by {words['chosen']}.",
    ]
    if h.get("ground_from", -1) >= 0 and h.get("ground_weight", 0) > 0:
        heads = h.get("ground_heads", 4)
        lines.append(
            f"- grounding loss (weight {h['ground_weight']}), from decoder layer {h['ground_from']} on: head 0 learns to "
            "attend from each answer position to the visual tokens of the object(s) the question names"
            + (", head 1 to a relation's first object" if heads > 1 else "")
            + (", head 2 to spread its attention over the counted objects and `<s>`" if heads > 2 else "")
            + (", head 3 to the second object of a relation" if heads > 3 else "")
            + f" (training only: the shipped weights are a plain {words['shipped']})")
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
