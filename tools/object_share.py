"""How many of the patches a vision-side method keeps lie on an object, on the demo model's test scenes.

    python tools/object_share.py --methods hiprune random visionzip --budget 192 --scenes 40 \
        --output docs/eval/new_methods/object_share.json

An object patch is one an object covers by more than 15% (``duet_vlm.synthetic.object_patches``); the
image's own share is what a uniform choice keeps. Prints and writes each method's mean share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import duet_vlm
from duet_vlm.demo.evaluate import load_demo
from duet_vlm.synthetic import object_patches, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--budget", type=int, default=192)
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    model, processor = load_demo()
    reducers = {name: duet_vlm.make(name, budget=args.budget) for name in args.methods}
    shares: dict[str, list[float]] = {name: [] for name in reducers}
    image_share = []
    for index in range(args.scenes):
        item = sample("test", index)
        on_object = object_patches(item.scene).any(axis=0)
        image_share.append(float(on_object.mean()))
        inputs = processor(images=item.image, text=f"USER: <image>\n{item.question} ASSISTANT:", return_tensors="pt")
        for name, reducer in reducers.items():
            with torch.no_grad(), reducer(model):
                model(**inputs)
            kept = reducer.stats.vision_kept[0]
            patches = (kept[kept > 0] - 1).numpy()  # the tower's index space has CLS first
            shares[name].append(float(on_object[patches].mean()))
    result = {
        "command": f"python tools/object_share.py --methods {' '.join(args.methods)} --budget {args.budget} "
                   f"--scenes {args.scenes}" + (f" --output {args.output}" if args.output else ""),
        "image": round(float(np.mean(image_share)), 4),
        "methods": {name: round(float(np.mean(values)), 4) for name, values in shares.items()},
    }
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
