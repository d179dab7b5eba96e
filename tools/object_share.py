"""How many of the visual tokens a vision-side method keeps lie on an object, on a demo model's test scenes.

    python tools/object_share.py --methods hiprune random visionzip --budget 192 --scenes 40 \
        --output docs/eval/new_methods/object_share.json
    python tools/object_share.py --model qwen2_5_vl --methods duet duet:vision_scores=norm random --budget 16 ...

An object patch is one an object covers by more than 15% (``duet_vlm.synthetic.object_patches``); on the
Qwen2.5-VL demo model a token is on an object where any of its 2x2 patches is. The image's own share is
what a uniform choice keeps. A method's options follow its name, as in ``duet-vlm eval``
(``NAME:KEY=VALUE,...``). Prints and writes each method's mean share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import duet_vlm
from duet_vlm.demo.evaluate import DEMO_MODELS, load_demo, question_prompt
from duet_vlm.demo.geometry import geometry_of
from duet_vlm.demo.sweep import method_spec
from duet_vlm.synthetic import object_patches, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--budget", type=int, default=192)
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--model", default="llava", choices=list(DEMO_MODELS), help="which shipped demo model")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    model, processor = load_demo(DEMO_MODELS[args.model])
    geometry = geometry_of(model)
    has_cls = duet_vlm.adapter_for(model).geometry.has_cls
    reducers = {}
    for spec in args.methods:
        name, options = method_spec(spec)
        reducers[spec] = duet_vlm.make(name, budget=args.budget, **options)
    shares: dict[str, list[float]] = {name: [] for name in reducers}
    image_share = []
    for index in range(args.scenes):
        item = sample("test", index)
        on_object = geometry.token_targets({"ground_target": object_patches(item.scene).any(axis=0)[None]})["ground_target"][0]
        image_share.append(float(on_object.mean()))
        inputs = processor(images=item.image, text=question_prompt(processor, item.question), return_tensors="pt")
        for name, reducer in reducers.items():
            with torch.no_grad(), reducer(model):
                model(**inputs)
            kept = reducer.stats.vision_kept[0]
            patches = (kept[kept > 0] - 1 if has_cls else kept).numpy()  # a CLS token comes first where there is one
            shares[name].append(float(on_object[patches].mean()))
    result = {
        "command": "python tools/object_share.py" + (f" --model {args.model}" if args.model != "llava" else "")
                   + f" --methods {' '.join(args.methods)} --budget {args.budget} --scenes {args.scenes}"
                   + (f" --output {args.output}" if args.output else ""),
        "image": round(float(np.mean(image_share)), 4),
        "methods": {name: round(float(np.mean(values)), 4) for name, values in shares.items()},
    }
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
