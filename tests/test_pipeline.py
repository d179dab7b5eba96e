"""``pipeline("image-text-to-text")`` with a reducer attached, batched: each answer equals the same
question asked alone with ``generate`` under the same reducer (the shipped demo model, so the
answers are words, not noise)."""

import pytest
import torch
from transformers import pipeline

import duet_vlm
from duet_vlm import synthetic as data

# ``demo``: the shipped demo model and its processor (tests/conftest.py).


@pytest.mark.parametrize("name", ["duet", "fastv", "visionzip"])
def test_batched_pipeline_equals_questions_asked_alone(demo, name):
    model, processor = demo
    samples = [data.sample("test", i) for i in range(3)]
    prompts = [f"USER: <image>\n{s.question} ASSISTANT:" for s in samples]
    images = [s.image for s in samples]
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    reducer = duet_vlm.make(name, budget=64)
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad(), reducer(model):
        answers = pipe(images=images, text=prompts, batch_size=3, generate_kwargs=settings, return_full_text=False)
        for sample, prompt, answer in zip(samples, prompts, answers):
            inputs = processor(images=sample.image, text=prompt, return_tensors="pt")
            out = model.generate(**inputs, **settings)
            alone = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            answer = answer[0] if isinstance(answer, list) else answer
            assert alone.strip() and answer["generated_text"].strip() == alone.strip()
    assert reducer.stats is not None and abs(reducer.stats.average_tokens - 64) <= 1
