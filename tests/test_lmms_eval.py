"""The lmms-eval plugin (``duet_llava_hf``) scores what the project's own evaluation scores.

Needs the ``lmms-eval`` extra (README, "Evaluating with lmms-eval"); skipped without it, unless
``DUET_REQUIRE_LMMS_EVAL=1`` (CI), which turns the skip into a failure. lmms-eval catches
generation errors and answers "" instead, so a broken reducer shows up only in the scores: the
test compares every answer and the accuracy with ``evaluate_accuracy`` on the same items.
"""

from __future__ import annotations

import io
import os
import textwrap

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
from duet_vlm.demo import data  # noqa: E402
from duet_vlm.demo.train import DEMO_MODEL_DIR, _normalise, evaluate_accuracy, load_demo  # noqa: E402

N = 21  # three questions of each of the seven types (test split, items 0..20, as `duet-vlm eval`)
TASK = "duet_synthetic_vqa"

UTILS = '''
import io

from PIL import Image

from duet_vlm.demo.train import _normalise  # the project's answer normalisation


def doc_to_visual(doc):
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
def task_dir(tmp_path, monkeypatch):
    """A local lmms-eval task: the first N test items of the synthetic benchmark in a parquet file."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    rows = {"index": [], "question": [], "answer": [], "qtype": [], "image": []}
    for i in range(N):
        sample = data.sample("test", i)
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")  # lossless: the model sees the same pixels
        for key, value in (("index", i), ("question", sample.question), ("answer", sample.answer),
                           ("qtype", sample.qtype), ("image", buffer.getvalue())):
            rows[key].append(value)
    folder = tmp_path / "task"
    folder.mkdir()
    pq.write_table(pa.table(rows), folder / "test.parquet")
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: {folder / "test.parquet"}
          cache_dir: {tmp_path / "hf_datasets"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        process_results: !function utils.process_results
        generation_kwargs:
          max_new_tokens: 3
          temperature: 0
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    return folder


def run_lmms_eval(task_dir, model_args: str) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(
        model="duet_llava_hf",
        model_args=f"pretrained={DEMO_MODEL_DIR},device=cpu,attn_implementation=sdpa,dtype=float32,{model_args}",
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


def test_bad_model_args_fail_before_loading():
    from duet_vlm.integrations.lmms_eval_models import DuetLlavaHf, method_options

    with pytest.raises(ValueError, match="unknown method 'nope'"):
        DuetLlavaHf(method="nope", pretrained=str(DEMO_MODEL_DIR))
    with pytest.raises(ValueError, match="has no option 'layer'"):
        DuetLlavaHf(method="duet", layer=16, pretrained=str(DEMO_MODEL_DIR))
    with pytest.raises(ValueError, match="budget"):
        DuetLlavaHf(method="duet", budget=0, pretrained=str(DEMO_MODEL_DIR))
    assert method_options("duet", {"layers": "", "cluster_width": "None"}) == {"layers": (), "cluster_width": None}


def test_the_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from duet_vlm.integrations.lmms_eval_models import DuetLlavaHf

    assert get_model("duet_llava_hf") is DuetLlavaHf
