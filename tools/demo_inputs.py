"""Write the demo model's first test question as the official-code recordings take it
(tests/data/vectors/demo-inputs.{json,safetensors}): the prompt's ids before and after its 576
image tokens, and the pixel values the demo processor makes, so that a driver running the official
code under transformers 4.37 (tools/record_*_official.py ``demo``) and the replay here read the same
numbers. A measurement tool, not part of the library.

    python tools/demo_inputs.py tests/data/vectors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from duet_vlm.demo.evaluate import load_demo
    from duet_vlm.evaluation import sample_batches, sample_prompts

    model, processor = load_demo()
    (image, question), = sample_prompts("synthetic:test", 1)
    inputs = next(sample_batches(processor, "synthetic:test", 1, batch_size=1))
    ids = inputs["input_ids"][0].tolist()
    image_id = model.config.image_token_id
    first, last = ids.index(image_id), len(ids) - 1 - ids[::-1].index(image_id)
    assert last - first + 1 == 576 and all(i == image_id for i in ids[first:last + 1])
    save_file({"pixel_values": inputs["pixel_values"].contiguous()}, out / "demo-inputs.safetensors")
    (out / "demo-inputs.json").write_text(json.dumps({
        "source": "duet_vlm.evaluation.sample_batches(processor, 'synthetic:test', 1): the first test question",
        "question": question, "prefix_ids": ids[:first], "suffix_ids": ids[last + 1:],
        "image_token_id": image_id, "pixel_values": "demo-inputs.safetensors:pixel_values"}) + "\n")
    print(question, ids[:first], ids[last + 1:])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
