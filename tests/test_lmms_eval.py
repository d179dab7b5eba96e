"""The lmms-eval plugin: ``duet_llava_hf`` scores what the project's own evaluation scores, and
every registered family's model answers and logs what a direct ``generate`` gives.

Needs the ``lmms-eval`` extra (README, "Evaluating with lmms-eval"); skipped without it, unless
``DUET_REQUIRE_LMMS_EVAL=1`` (CI), which turns the skip into a failure. lmms-eval catches
generation errors and answers "" instead, so a broken reducer shows up only in the answers: the
tests compare them with the project's evaluation (``evaluate_accuracy``) or with a direct run.
"""

from __future__ import annotations

import gc
import io
import os
import textwrap
import weakref

import pytest
import torch

if os.environ.get("DUET_REQUIRE_LMMS_EVAL") == "1":
    import lmms_eval  # noqa: F401 - an ImportError here fails the run instead of skipping
    import pyarrow as pa
else:
    pytest.importorskip("lmms_eval")
    pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

import duet_vlm  # noqa: E402
from duet_vlm import synthetic as data  # noqa: E402
from duet_vlm.demo.evaluate import DEMO_MODEL_DIR, _normalise, evaluate_accuracy, load_demo  # noqa: E402

N = 21  # three questions of each of the seven types (test split, items 0..20, as `duet-vlm eval`)
TASK = "duet_synthetic_vqa"

UTILS = '''
import io

from PIL import Image

from duet_vlm.demo.evaluate import _normalise  # the project's answer normalisation


def doc_to_visual(doc):
    if "video" in doc:  # a file path; lmms-eval's video models decode it themselves
        return [doc["video"]]
    return [Image.open(io.BytesIO(doc["image"])).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(_normalise(results[0]) == doc["answer"])}
'''


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def write_task(folder, rows: dict, max_new_tokens: int = 3, generation: str = ""):
    """A local lmms-eval task named TASK: ``rows`` (columns of equal length: question, answer and
    image PNG bytes or a video path) in a parquet file, with a YAML and the UTILS beside it;
    ``generation``: more ``generation_kwargs`` lines (``key: value``)."""
    folder.mkdir()
    pq.write_table(pa.table(rows), folder / "test.parquet")
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: {folder / "test.parquet"}
          cache_dir: {folder.parent / "hf_datasets"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        process_results: !function utils.process_results
        generation_kwargs:
          max_new_tokens: {max_new_tokens}
          temperature: 0
          do_sample: false
          {generation}
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    return folder


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the model sees the same pixels
    return buffer.getvalue()


@pytest.fixture
def task_dir(tmp_path, offline):
    """A local lmms-eval task: the first N test items of the synthetic benchmark in a parquet file."""
    samples = [data.sample("test", i) for i in range(N)]
    rows = {"index": list(range(N)), "question": [s.question for s in samples], "answer": [s.answer for s in samples],
            "qtype": [s.qtype for s in samples], "image": [png(s.image) for s in samples]}
    return write_task(tmp_path / "task", rows)


def run_lmms_eval(task_dir, model_args: str, model="duet_llava_hf",
                  base_args=f"pretrained={DEMO_MODEL_DIR},device=cpu,attn_implementation=sdpa,dtype=float32") -> dict:
    """``simple_evaluate`` on the local task; ``model`` is a registered name or an lmms-eval model."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(
        model=model,
        model_args=f"{base_args},{model_args}",
        tasks=[TASK],
        task_manager=manager,
        batch_size=1,
        bootstrap_iters=0,
        log_samples=True,
        process_docs_parallel=1,
    )


def project_run(model, processor, reducer) -> tuple[dict, dict]:
    """``duet-vlm eval``'s library loop on the same items, with whole-run reducer totals."""
    totals = {"rows": 0, "tokens": 0.0, "flops": 0, "flops_full": 0, "kv": 0, "kv_full": 0}

    def collect(message):
        stats = reducer.stats
        rows = len(stats.text_tokens)
        totals["rows"] += rows
        totals["tokens"] += rows * stats.average_tokens
        totals["flops"] += stats.flops_exact
        totals["flops_full"] += stats.flops_exact_full
        totals["kv"] += stats.kv_bytes
        totals["kv_full"] += stats.kv_bytes_full

    result = evaluate_accuracy(model, processor, split="test", n=N, wrap=lambda: reducer(model),
                               return_predictions=True, progress=collect)
    return result, totals


@pytest.mark.parametrize(
    "model_args, method, options",
    [
        ("method=full", "full", {}),
        ("method=duet,budget=64", "duet", {"budget": 64}),
        # the same DUET configuration, spelled out: tuple options take ';'-separated values
        ("method=duet,dominant=86,contextual=16,layers=16;24,ratios=0.5;0.0", "duet",
         {"dominant": 86, "contextual": 16, "layers": (16, 24), "ratios": (0.5, 0.0)}),
    ],
    ids=["full", "duet64", "duet-options"],
)
def test_lmms_eval_scores_equal_the_project_evaluation(task_dir, one_thread, model_args, method, options):
    results = run_lmms_eval(task_dir, model_args)
    model, processor = load_demo()
    expected, totals = project_run(model, processor, duet_vlm.make(method, **options))

    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    predictions = [_normalise(s["filtered_resps"][0]) for s in samples]
    assert len(samples) == expected["n"] == N
    assert predictions == [p["prediction"] for p in expected["predictions"]]
    score = results["results"][TASK]["exact_match,none"]
    assert score == expected["accuracy"]
    # far above chance on these items (an empty answer from a swallowed error scores 0)
    assert score > 0.5, predictions

    throughput = results["throughput"]
    assert throughput["avg_duet_vlm_prefills"] == totals["rows"] == N
    assert throughput["avg_duet_vlm_visual_tokens_per_layer"] == pytest.approx(totals["tokens"] / N)
    assert throughput["avg_duet_vlm_flops_ratio"] == pytest.approx(totals["flops"] / totals["flops_full"])
    assert throughput["avg_duet_vlm_kv_ratio"] == pytest.approx(totals["kv"] / totals["kv_full"])
    if method == "full":
        assert throughput["avg_duet_vlm_visual_tokens_per_layer"] == 576
        assert throughput["avg_duet_vlm_flops_ratio"] == 1.0
    else:
        assert throughput["avg_duet_vlm_visual_tokens_per_layer"] == pytest.approx(63.75)
        assert throughput["avg_duet_vlm_flops_ratio"] < 0.3
    print(f"\n{model_args}: lmms-eval exact_match {score:.4f}, project accuracy {expected['accuracy']:.4f}, "
          f"visual tokens/layer {throughput['avg_duet_vlm_visual_tokens_per_layer']:.2f}, "
          f"FLOPs ratio {throughput['avg_duet_vlm_flops_ratio']:.3f}, KV ratio {throughput['avg_duet_vlm_kv_ratio']:.3f}")


MODELS = ("duet_llava_hf", "duet_video_llava", "duet_qwen2_vl", "duet_qwen2_5_vl", "duet_qwen3_vl")


@pytest.mark.parametrize("name", MODELS)
def test_bad_model_args_fail_before_loading(name, tmp_path):
    """Each model checks the method's arguments before its lmms-eval class loads anything (the path
    does not exist: reaching the loader would raise OSError instead)."""
    from lmms_eval.models import get_model

    model, missing = get_model(name), str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        model(method="nope", pretrained=missing)
    with pytest.raises(ValueError, match="has no option 'layer'"):
        model(method="duet", layer=16, pretrained=missing)
    with pytest.raises(ValueError, match="budget must be a positive int"):
        model(method="duet", budget=0, pretrained=missing)
    with pytest.raises(ValueError, match="ratio must lie in"):
        model(method="duet", ratio=1.5, pretrained=missing)
    with pytest.raises(ValueError, match="a budget or a ratio, not both"):
        model(method="duet", budget=64, ratio=0.5, pretrained=missing)


def test_tuple_and_none_options():
    from duet_vlm.integrations.lmms_eval_models import method_options

    assert method_options("duet", {"layers": "", "cluster_width": "None"}) == {"layers": (), "cluster_width": None}


def test_the_entry_point_registers_every_model():
    from lmms_eval.models import get_model
    from lmms_eval.models.chat.llava_hf import LlavaHf
    from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL
    from lmms_eval.models.chat.qwen3_vl import Qwen3_VL
    from lmms_eval.models.simple.qwen2_vl import Qwen2_VL
    from lmms_eval.models.simple.video_llava import VideoLLaVA

    from duet_vlm.integrations.lmms_eval_models import ReducerMixin

    extends = {  # registered name -> the lmms-eval class it extends (chat, or simple where only that exists)
        "duet_llava_hf": LlavaHf,
        "duet_llava_next_hf": LlavaHf,  # aliases: lmms-eval's llava_hf loads all three LLaVA HF families
        "duet_llava_onevision_hf": LlavaHf,
        "duet_video_llava": VideoLLaVA,
        "duet_qwen2_vl": Qwen2_VL,
        "duet_qwen2_5_vl": Qwen2_5_VL,
        "duet_qwen3_vl": Qwen3_VL,
    }
    for name, base in extends.items():
        model = get_model(name)  # lmms-eval also checks is_simple against the manifest's kind
        assert model.__bases__ == (ReducerMixin, base), name
    assert get_model("duet_llava_next_hf") is get_model("duet_llava_hf")


# ------------------------------------------------------------------ the other families
# Tiny models of the real transformers classes, saved with save_pretrained next to the processor
# lmms-eval would load. Each runs one question through the model registered under the family's
# name, with all tokens and with DUET at a ratio, and checks the answer and the logged statistics
# against a direct `generate` on the same inputs.
#
# transformers' video processors require torchvision, which the CPU install removes (README), and
# a processor that has a video_processor attribute (LLaVA-OneVision's, Video-LLaVA's) cannot even be
# constructed without it. Those two families therefore get the real processor class minus its video
# processor (OneVision: images only), or with a stand-in that runs the image processor on each frame
# (Video-LLaVA), handed to lmms-eval's class in place of what it would load from the checkpoint.
# Everything else is lmms-eval's own code: prompt building, video decoding (PyAV), generation.

QUESTION = 1  # the synthetic test item asked (its image; a video of coloured frames for Video-LLaVA)
IMAGE_ID, VIDEO_ID = 4, 71  # <image> in the demo tokenizer, <video> added after its 71 tokens


def _stub_processor(monkeypatch, module: str, processor) -> None:
    """The lmms-eval class in ``module`` loads ``processor`` instead of a hub processor."""
    monkeypatch.setattr(f"{module}.AutoProcessor",
                        type("Loader", (), {"from_pretrained": staticmethod(lambda *a, **k: processor)}))


def _attached_then_released(lm) -> None:
    """The reducer is attached to lmms-eval's model (a second attach is refused), and ``clean()``
    detached it, so that lmms-eval could free the weights."""
    model = weakref.ref(lm.model)
    with pytest.raises(RuntimeError, match="already attached"):
        duet_vlm.make("full").attach(model())
    lm.clean()
    gc.collect()
    assert model() is None


def _tokenizer():
    from duet_vlm.demo.processor import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [IMAGE_ID, VIDEO_ID]
    return tokenizer


def _text_config(tokenizer, kind="llama", layers=8):
    from transformers import LlamaConfig, Qwen2Config

    config = LlamaConfig if kind == "llama" else Qwen2Config
    return config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)


def _clip(side):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=14 * side, patch_size=14, projection_dim=32, hidden_act="quick_gelu")


def _save(model, path):
    with torch.no_grad():  # sharper attention than the default init, as in the family tests
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    # A random model may well generate a placeholder token, which no real checkpoint emits.
    model.generation_config.suppress_tokens = [IMAGE_ID, VIDEO_ID]
    model.save_pretrained(path)


class WithoutVideoCheck:
    """A processor that accepts a video processor which is not a transformers one (or None): the
    class check looks the base class up among transformers' video processors, absent without torchvision."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name != "video_processor":
            return super().check_argument_for_proper_class(argument_name, argument)


def llava_next(path, monkeypatch):
    """LLaVA-NeXT with its real processor (PIL image processor), saved and loaded from ``path``."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    from duet_vlm.demo.processor import CHAT_TEMPLATE

    tokenizer, pinpoints = _tokenizer(), [[56, 112], [112, 56], [112, 112]]
    config = LlavaNextConfig(vision_config=_clip(4), text_config=_text_config(tokenizer), image_grid_pinpoints=pinpoints,
                             image_token_id=IMAGE_ID, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    torch.manual_seed(0)
    _save(LlavaNextForConditionalGeneration(config), path)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                   num_additional_image_tokens=1)
    processor.save_pretrained(path)
    return processor


def llava_onevision(path, monkeypatch):
    """LLaVA-OneVision (SigLIP, Qwen2) with its real processor class minus the video processor."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from duet_vlm.demo.processor import CHAT_TEMPLATE

    class ImagesOnly(WithoutVideoCheck, LlavaOnevisionProcessor):
        pass

    tokenizer, pinpoints = _tokenizer(), [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=4)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=_text_config(tokenizer, "qwen2"),
                                  image_token_id=IMAGE_ID,
                                  video_token_id=VIDEO_ID, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    _save(LlavaOnevisionForConditionalGeneration(config), path)
    processor = ImagesOnly(image_processor=LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                                           image_grid_pinpoints=pinpoints),
                           tokenizer=tokenizer, num_image_tokens=64, vision_feature_select_strategy="full",
                           chat_template=CHAT_TEMPLATE)
    _stub_processor(monkeypatch, "lmms_eval.models.simple.llava_hf", processor)
    return processor


def video_llava(path, monkeypatch):
    """Video-LLaVA with the real processor class; its video processor runs the image processor per frame."""
    from transformers import (
        BatchFeature,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
        VideoLlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.video_utils import make_batched_videos

    class PerFrame:
        def __init__(self, image_processor):
            self.image_processor = image_processor

        def __call__(self, videos, **kwargs):
            frames = [self.image_processor(list(video), return_tensors="pt")["pixel_values"]
                      for video in make_batched_videos(videos)]
            return BatchFeature({"pixel_values_videos": torch.stack(frames)})

    class FramesAsImages(WithoutVideoCheck, VideoLlavaProcessor):
        pass

    tokenizer, side = _tokenizer(), 4
    config = VideoLlavaConfig(vision_config=_clip(side), text_config=_text_config(tokenizer),
                              image_token_id=IMAGE_ID,
                              video_token_id=VIDEO_ID, vision_feature_layer=-2,
                              vision_feature_select_strategy="default", image_seq_length=side * side,
                              video_seq_length=8 * (side * side + 1))
    torch.manual_seed(0)
    _save(VideoLlavaForConditionalGeneration(config), path)
    images = CLIPImageProcessorPil(size={"shortest_edge": 14 * side}, crop_size={"height": 14 * side, "width": 14 * side})
    processor = FramesAsImages(image_processor=images, video_processor=PerFrame(images), tokenizer=tokenizer, patch_size=14)
    monkeypatch.setattr("lmms_eval.models.simple.video_llava.VideoLlavaProcessor",
                        type("Loader", (), {"from_pretrained": staticmethod(lambda *a, **k: processor)}))
    return processor


def write_video(path, frames=12, side=64):
    """An MPEG-4 clip of coloured frames (a square moving across), decodable by lmms-eval's PyAV reader."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = np.full((side, side, 3), (40 * i) % 256, dtype=np.uint8)
            frame[8 : 24, 4 * i : 4 * i + 16] = (255, 0, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def chat_inputs(processor, question, image, video_path):
    """What lmms-eval's chat ``llava_hf`` builds for one image and a question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(images=[image], text=text, return_tensors="pt")


def video_llava_inputs(processor, question, image, video_path):
    """What lmms-eval's ``video_llava`` builds: 8 frames decoded with PyAV and its fixed prompt."""
    from lmms_eval.models.model_utils.load_video import read_video

    clip = read_video(str(video_path), num_frm=8)
    return processor(text=f"USER: <video>{question}? ASSISTANT:", videos=clip, return_tensors="pt")


def chat_answer(lm, model, inputs, max_new_tokens):
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=lm.eot_token_id,
                            eos_token_id=lm.eot_token_id)
    return lm.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def video_llava_answer(lm, model, inputs, max_new_tokens):
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = lm._processor.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    return text.split("ASSISTANT:")[-1].strip()


FAMILIES = {  # registered name -> (builder, inputs as lmms-eval builds them, answer as lmms-eval decodes it)
    "duet_llava_next_hf": (llava_next, chat_inputs, chat_answer),
    "duet_llava_onevision_hf": (llava_onevision, chat_inputs, chat_answer),
    "duet_video_llava": (video_llava, video_llava_inputs, video_llava_answer),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_answers_and_logs_its_statistics(name, tmp_path, offline, one_thread, monkeypatch):
    from lmms_eval.models import get_model

    build, inputs_for, answer_of = FAMILIES[name]
    processor = build(tmp_path / "model", monkeypatch)
    sample, video = data.sample("test", QUESTION), write_video(tmp_path / "clip.mp4")
    row = {"question": [sample.question], "answer": [sample.answer]}
    row.update({"video": [str(video)]} if name == "duet_video_llava" else {"image": [png(sample.image)]})
    task = write_task(tmp_path / "task", row, max_new_tokens=4)
    logged = {}
    for method_args, method in (("method=full", {"name": "full"}), ("method=duet,ratio=0.25", {"name": "duet", "ratio": 0.25})):
        lm = get_model(name).create_from_arg_string(
            f"pretrained={tmp_path / 'model'},device=cpu,dtype=float32,{method_args}", {"batch_size": 1})
        model = lm.model  # lmms-eval deletes its model attributes at the end of simple_evaluate
        results = run_lmms_eval(task, method_args, model=lm)
        (response,) = [s["filtered_resps"][0] for s in results["samples"][TASK]]

        # The same inputs straight into the model under the same method. Attaching again also shows
        # that lmms-eval's clean() removed the plugin's reducer (a second attach would be refused).
        reducer = duet_vlm.make(**method)
        inputs = inputs_for(processor, sample.question, sample.image.convert("RGB"), video)
        with torch.no_grad(), reducer(model):
            expected = answer_of(lm, model, inputs, 4)
        # lmms-eval's chat models answer "" when generation raises: an equal non-empty answer rules it out
        assert response == expected != ""
        stats, throughput = reducer.stats, results["throughput"]
        assert throughput["avg_duet_vlm_prefills"] == 1
        assert throughput["avg_duet_vlm_visual_tokens_per_layer"] == pytest.approx(stats.average_tokens)
        assert throughput["avg_duet_vlm_llm_input_tokens"] == stats.llm_input_tokens
        assert throughput["avg_duet_vlm_flops_ratio"] == pytest.approx(stats.flops_exact / stats.flops_exact_full)
        assert throughput["avg_duet_vlm_kv_ratio"] == pytest.approx(stats.kv_bytes / stats.kv_bytes_full)
        logged[method_args] = throughput, stats.items
        print(f"\n{name} {method_args}: {response!r}, visual tokens/layer "
              f"{throughput['avg_duet_vlm_visual_tokens_per_layer']:.2f} of {stats.visual_tokens}, "
              f"FLOPs ratio {throughput['avg_duet_vlm_flops_ratio']:.3f}")

    (full, (item,)), (reduced, _) = logged.values()
    assert item.modality == ("video" if name == "duet_video_llava" else "image")
    assert full["avg_duet_vlm_visual_tokens_per_layer"] == item.tokens
    assert full["avg_duet_vlm_flops_ratio"] == 1.0
    assert abs(reduced["avg_duet_vlm_visual_tokens_per_layer"] - 0.25 * item.tokens) <= item.units
    assert reduced["avg_duet_vlm_flops_ratio"] < 0.6 and reduced["avg_duet_vlm_kv_ratio"] < 0.6
    # clean() let go of the model: nothing of the plugin keeps the weights alive
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


# ------------------------------------------------------------------ Qwen-VL
def _qwen(kind, path):
    """A tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5 of the real class, with the demo tokenizer, saved to ``path``."""
    import transformers as tf

    text = {"vocab_size": VIDEO_ID + 1, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"depth": 2, "num_heads": 4, "spatial_merge_size": 2}
    if kind == "qwen2_vl":
        config, model = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2, patch_size=14)
    elif kind == "qwen2_5_vl":
        config, model = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        vision.update(hidden_size=32, out_hidden_size=64, intermediate_size=64, patch_size=14, fullatt_block_indexes=[1])
    elif kind == "qwen3_5":  # a hybrid decoder, attention in layers 0 and 2: DUET's boundary (2) can score
        config, model = tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [1, 1, 0], "mrope_interleaved": True,
                                   "partial_rotary_factor": 0.25}
        text.update(num_hidden_layers=4, layer_types=["full_attention", "linear_attention"] * 2, linear_key_head_dim=8,
                    linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
        vision.update(hidden_size=32, out_hidden_size=64, intermediate_size=64, patch_size=16)
    else:
        config, model = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        vision.update(hidden_size=32, out_hidden_size=64, intermediate_size=64, patch_size=16, deepstack_visual_indexes=[1])
    torch.manual_seed(0)
    model(config(text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID)).save_pretrained(path)
    _tokenizer().save_pretrained(path)


@pytest.mark.parametrize("name", ["duet_qwen2_vl", "duet_qwen2_5_vl", "duet_qwen3_vl", "duet_qwen3_5"])
def test_qwen_models_load_and_attach(name, tmp_path, offline, monkeypatch):
    """lmms-eval's Qwen class loads a tiny checkpoint of its real transformers class (its processor,
    which needs torchvision, replaced by a placeholder) with the method's options taken out of its
    arguments, and the reducer attaches. Generation through lmms-eval needs qwen-vl-utils, which
    imports torchvision: not on this install (the adapter's own tests run these models)."""
    import json

    from lmms_eval.models import get_model
    from loguru import logger

    kind = name.removeprefix("duet_")
    _qwen(kind, tmp_path / "model")
    # the chat classes inherit __init__ from the simple ones, which look AutoProcessor up in their module
    loader = "qwen3_vl" if kind == "qwen3_5" else kind  # Qwen3.5's classes are Qwen3-VL's with other defaults
    _stub_processor(monkeypatch, f"lmms_eval.models.simple.{loader}", None)
    logged = []
    sink = logger.add(logged.append, format="{message}")
    try:
        lm = get_model(name).create_from_arg_string(
            f"pretrained={tmp_path / 'model'},device=cpu,device_map=cpu,max_pixels=50176,method=duet,ratio=0.25,"
            "cluster_width=none", {"batch_size": 1})
    finally:
        logger.remove(sink)
    assert lm.max_pixels == 50176  # lmms-eval's own argument
    assert (lm.reducer.ratio, lm.reducer.build(64).cluster_width) == (0.25, None)  # the method's
    # the log records exactly what runs, and the record rebuilds it
    (line,) = [m.strip() for m in logged if m.startswith("duet_vlm: attached ")]
    record = json.loads(line.removeprefix("duet_vlm: attached "))
    assert record == lm.reducer_record and duet_vlm.from_dict(record) == lm.reducer
    assert lm.reducer == duet_vlm.make("duet", ratio=0.25, cluster_width=None)
    _attached_then_released(lm)


def test_internvl_loads_and_attaches(tmp_path, offline, monkeypatch):
    """lmms-eval's ``internvl_hf`` loads a tiny InternVL3 checkpoint of the real class (its processor
    replaced by one that carries the tokenizer) with the method's options taken out of its arguments,
    and the reducer attaches to it; ``clean()`` lets the weights go."""
    from types import SimpleNamespace

    import transformers as tf
    from lmms_eval.models import get_model

    tokenizer = _tokenizer()
    vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=[32, 32], patch_size=[4, 4])
    text = tf.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0)
    config = tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, image_seq_length=16,
                               downsample_ratio=0.5, vision_feature_layer=-1)
    tf.InternVLForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    _stub_processor(monkeypatch, "lmms_eval.models.chat.internvl_hf", SimpleNamespace(tokenizer=tokenizer))
    lm = get_model("duet_internvl_hf").create_from_arg_string(
        f"pretrained={tmp_path / 'model'},device=cpu,device_map=cpu,max_patches=6,method=fastv,ratio=0.25,layer=1",
        {"batch_size": 1})
    assert lm.max_patches == 6  # lmms-eval's own argument
    assert lm.reducer == duet_vlm.make("fastv", ratio=0.25, layer=1)  # the method's
    assert duet_vlm.adapters.adapter_for(lm.model).family == "internvl"
    _attached_then_released(lm)


def test_gemma3_loads_and_attaches(tmp_path, offline, monkeypatch):
    """lmms-eval's simple ``gemma3`` loads a tiny Gemma 3 checkpoint of the real class (its processor
    replaced by a stub) with the method's options taken out of its arguments, and the reducer
    attaches to it; ``clean()`` lets the weights go."""
    from types import SimpleNamespace

    import transformers as tf
    from lmms_eval.models import get_model

    tokenizer = _tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=4)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=IMAGE_ID)
    tf.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    _stub_processor(monkeypatch, "lmms_eval.models.simple.gemma3", SimpleNamespace(tokenizer=tokenizer))
    lm = get_model("duet_gemma3").create_from_arg_string(
        f"pretrained={tmp_path / 'model'},device=cpu,device_map=cpu,method=fastv,ratio=0.75,layer=1", {"batch_size": 1})
    assert lm.reducer == duet_vlm.make("fastv", ratio=0.75, layer=1)
    assert duet_vlm.adapters.adapter_for(lm.model).family == "gemma3"
    _attached_then_released(lm)


def test_gemma4_loads_and_attaches(tmp_path, offline, monkeypatch):
    """lmms-eval's simple ``gemma4`` loads a tiny Gemma 4 checkpoint of the real class (its processor
    replaced by a stub) with the method's options taken out of its arguments and its own
    ``max_soft_tokens`` kept, and the reducer attaches to it; ``clean()`` lets the weights go."""
    from types import SimpleNamespace

    import transformers as tf
    from lmms_eval.models import get_model

    tokenizer = _tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=16,
                pad_token_id=0, hidden_size_per_layer_input=8, vocab_size_per_layer_input=len(tokenizer))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, patch_size=4, pooling_kernel_size=3, position_embedding_size=64)
    config = tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=IMAGE_ID,
                             boi_token_id=1, eoi_token_id=2, video_token_id=3, audio_token_id=4)
    tf.Gemma4ForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    _stub_processor(monkeypatch, "lmms_eval.models.simple.gemma4",
                    SimpleNamespace(tokenizer=tokenizer, video_processor=SimpleNamespace()))
    lm = get_model("duet_gemma4").create_from_arg_string(
        f"pretrained={tmp_path / 'model'},device=cpu,device_map=cpu,max_soft_tokens=140,method=duet,budget=32",
        {"batch_size": 1})
    assert lm.max_soft_tokens == 140  # lmms-eval's own argument: the rung
    assert lm.reducer == duet_vlm.make("duet", budget=32)
    assert duet_vlm.adapters.adapter_for(lm.model).family == "gemma4"
    _attached_then_released(lm)


def test_a_request_budget_and_a_checkpoints_saved_reducer(tmp_path, offline, one_thread):
    """A task whose generation arguments hold ``duet_budget`` runs at that budget, whatever the
    model's own (the key never reaches lmms-eval's class); a checkpoint that carries
    ``duet_vlm_reducer.json`` attaches that reducer unless ``saved_reducer=false`` or a method or
    budget is given. Answers equal the project's evaluation at the same budget."""
    import shutil

    n = 7
    samples = [data.sample("test", i) for i in range(n)]
    rows = {"index": list(range(n)), "question": [s.question for s in samples], "answer": [s.answer for s in samples],
            "qtype": [s.qtype for s in samples], "image": [png(s.image) for s in samples]}
    model, processor = load_demo()
    at_128 = evaluate_accuracy(model, processor, split="test", n=n, wrap=lambda: duet_vlm.make("duet", budget=128)(model),
                               return_predictions=True)

    def answers(results):
        samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
        return [_normalise(s["filtered_resps"][0]) for s in samples]

    per_request = write_task(tmp_path / "per_request", rows, generation="duet_budget: 128")
    results = run_lmms_eval(per_request, "method=duet,budget=64")
    assert answers(results) == [p["prediction"] for p in at_128["predictions"]]
    assert results["throughput"]["avg_duet_vlm_visual_tokens_per_layer"] == pytest.approx(128.0)

    tuned = tmp_path / "tuned"
    shutil.copytree(DEMO_MODEL_DIR, tuned)
    duet_vlm.save_reducer(duet_vlm.make("duet", budget=128), tuned)
    plain = write_task(tmp_path / "plain", rows)
    base = f"pretrained={tuned},device=cpu,attn_implementation=sdpa,dtype=float32"
    saved = run_lmms_eval(plain, "saved_reducer=true", base_args=base)
    assert answers(saved) == [p["prediction"] for p in at_128["predictions"]]
    assert saved["throughput"]["avg_duet_vlm_visual_tokens_per_layer"] == pytest.approx(128.0)
    ignored = run_lmms_eval(plain, "saved_reducer=false,budget=64", base_args=base)
    assert ignored["throughput"]["avg_duet_vlm_visual_tokens_per_layer"] == pytest.approx(63.75)


def test_request_budgets_group_the_requests():
    """Requests of several budgets in one call: each group's generate calls run under its budget on
    every row, the keys leave the generation arguments, every answer returns to its request's place,
    and the model's generate is restored."""
    from types import SimpleNamespace

    from duet_vlm.integrations.lmms_eval_models import ReducerMixin, request_budget

    class Fake(ReducerMixin):
        def __init__(self):
            self.reducer = duet_vlm.make("duet", budget=64)

    fake = Fake()
    seen = []
    original = lambda input_ids: seen.append(fake.reducer.row_budgets(input_ids.shape[0]))  # noqa: E731
    fake.model = SimpleNamespace(generate=original)
    shared = {"max_new_tokens": 3, "duet_budget": 128}
    requests = [SimpleNamespace(args=("q", lambda doc: [], kwargs, 0, "task", "test"))  # a chat model's arguments
                for kwargs in (shared, {"duet_ratio": "0.25"}, shared, {})]

    def generate_until(group):
        fake.model.generate(input_ids=torch.zeros(2, 3))
        return [f"answer {id(r)}" for r in group]

    results = fake._per_request_budgets(requests, generate_until)
    assert results == [f"answer {id(r)}" for r in requests]
    assert seen[0] == [128, 128] and seen[2] is None
    assert [value(duet_vlm.Geometry(32, 576, (24, 24), True)) for value in seen[1]] == [144, 144]
    assert fake.model.generate is original and "duet_budget" not in shared
    assert fake._per_request_budgets(requests[3:], lambda group: ["plain"]) == ["plain"]
    with pytest.raises(ValueError, match="not both"):
        request_budget({"duet_budget": 128, "duet_ratio": 0.5})


# ----------------------------------------------------------------------------- duet-vlm reproduce
def test_reproduce_runs_the_table_resumes_and_lists_its_plan(task_dir, one_thread, tmp_path, monkeypatch):
    """``duet-vlm reproduce`` end to end on the demo model and the local task: the dry run lists the
    checkpoint, the task's data file and one command per setting; the run's scores equal lmms-eval's
    own run of each setting; a second run loads nothing (every cell is done) and gives the same
    table; the command prints it and the dry run then has nothing left to run."""
    from typer.testing import CliRunner

    from duet_vlm.cli import app
    from duet_vlm.integrations import reproduce

    out = tmp_path / "out"
    settings = dict(methods=("duet", "visionzip"), budgets=(64,), tasks=[TASK], model=str(DEMO_MODEL_DIR), device="cpu",
                    dtype="float32", include_path=task_dir)
    planned = reproduce.plan(out, **settings, extra_model_args="attn_implementation=sdpa")
    assert [cell.name for cell in planned.cells] == ["full", "duet-64", "visionzip-64"]
    assert "parquet" in planned.datasets[TASK] and "test.parquet" in planned.datasets[TASK]
    assert len(planned.commands) == 3 and "method=duet,budget=64" in planned.commands[1]

    seen = []
    table = reproduce.run(out, **settings, extra_model_args="attn_implementation=sdpa",
                          progress=lambda label, done, total: seen.append((done, total)))
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    scores = {row["cell"]: row["entries"][0]["ours"] for row in table["rows"]}
    for cell, args in (("full", "method=full"), ("duet-64", "method=duet,budget=64"),
                       ("visionzip-64", "method=visionzip,budget=64")):
        direct = run_lmms_eval(task_dir, args)["results"][TASK]["exact_match,none"]
        assert scores[cell] == pytest.approx(direct), cell
    full = next(row for row in table["rows"] if row["cell"] == "full")
    assert full["average_retained"] == pytest.approx(100.0) and full["average_within"]
    duet = next(row for row in table["rows"] if row["cell"] == "duet-64")
    assert duet["reported_average"] == 95.4 and duet["average_retained"] == pytest.approx(100 * scores["duet-64"] / scores["full"])

    import lmms_eval.evaluator

    def never(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", never)
    assert reproduce.run(out, **settings)["rows"] == table["rows"]
    assert reproduce.plan(out, **settings).commands == []

    common = ["--output-dir", str(out), "--methods", "duet", "--methods", "visionzip", "--budgets", "64", "--tasks", TASK,
              "--model", str(DEMO_MODEL_DIR), "--device", "cpu", "--dtype", "float32", "--include-path", str(task_dir)]
    result = CliRunner().invoke(app, ["reproduce", *common], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "duet-64" in result.output and "95.4" in result.output
    dry = CliRunner().invoke(app, ["reproduce", *common, "--dry-run"], env={"COLUMNS": "160"})
    assert dry.exit_code == 0 and "nothing left to run" in dry.output and str(DEMO_MODEL_DIR) in dry.output


def test_reproduce_dry_run_lists_the_papers_data_sets(tmp_path):
    """Without a GPU or the Hub: the paper's seven tasks resolve in lmms-eval's index to the data sets
    a run downloads, and every method at every budget is one command."""
    from duet_vlm.integrations import reproduce

    planned = reproduce.plan(tmp_path)
    assert set(planned.datasets) == {b.task for b in reproduce.BENCHMARKS}
    assert "GQA" in planned.datasets["gqa"] and "MME" in planned.datasets["mme"]
    assert planned.model == "llava-hf/llava-1.5-7b-hf"
    assert len(planned.commands) == 1 + len(reproduce.METHODS) * len(reproduce.BUDGETS)
    with pytest.raises(ValueError, match="full always runs"):
        reproduce.cells(("full",), (64,))


def test_a_paper_task_without_its_metric_has_no_score(tmp_path):
    """A cell of MME whose results lack MME's scores (another lmms-eval's names) is not scored with
    whatever metric came first; a task outside the paper's reads its first metric."""
    import json

    from duet_vlm.integrations import reproduce

    todo = reproduce.cells(("duet",), (64,))
    for cell in todo:
        folder = tmp_path / "cells" / cell.name
        folder.mkdir(parents=True)
        (folder / "mme.json").write_text(json.dumps({"task": "mme", "metrics": {"accuracy,none": 0.9}, "score": None}))
        (folder / "local.json").write_text(json.dumps({"task": "local", "metrics": {"exact_match,none": 0.5}, "score": None}))
    table = reproduce.results_table(tmp_path, todo, ["mme", "local"])
    mme, local = table["rows"][1]["entries"]
    assert mme["ours"] is None and mme["within"] is None
    assert local["ours"] == 0.5
