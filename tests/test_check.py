"""``duet-vlm check`` (issue #37): its checks pass on every family's tiny model and on the shipped demo
model, and each one fails on a fault planted where the library could plausibly go wrong.

- every family of ``models.FAMILIES`` under DUET: every check passes or is not applicable for a
  stated reason (Gemma 4's ideal, prompt lookup on a stateful Qwen3.5); every method on every family
  is the marked ``matrix`` suite's (``test_every_method_on_every_family``);
- a planted fault per check, each in the library (a hook that perturbs the decoder's input, a hook
  left behind, a weight moved, padding that leaks into a row, statistics that disagree with the
  plan, positions shifted after a boundary, a static cache of the prompt's length): that check fails, the
  report is not ``ok``, and a check that raises is reported failed, not crashed;
- the command: ``duet-vlm check --model demo`` exits 0 with a table that fits 80 columns, ``--json``
  carries the versions; a planted fault exits 1; bad options are refused before the model loads.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

import duet_vlm
from duet_vlm import cli, compat
from duet_vlm.check import check_model
from duet_vlm.check.report import FAIL, PASS
from duet_vlm.runtime import attachment, positions, record

from checks import assert_check_passes, family_on, release_needed
from models import BUDGETED, FAMILIES

runner = CliRunner()


def _run(family_name: str = "llava", method: str = "duet", **options):
    family = FAMILIES[family_name]
    model = family.model()
    batch = family.batch(model)
    rows = [family.row(batch, b) for b in range(batch["input_ids"].shape[0])]
    return check_model(model, batch, rows, method, ratio=0.5, rounds=1, new_tokens=3, **options)


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_every_check_passes_on_every_family(family_name):
    needed = release_needed(FAMILIES[family_name].model())
    if needed is not None:  # the family is refused on the installed transformers, naming the release
        with pytest.raises(TypeError, match=f"transformers {needed} or newer"):
            _run(family_name, skip=("timing",))
        return
    report = _run(family_name, skip=("timing",))
    assert_check_passes(report, family_name)
    ideal = report.result("ideal")
    if ideal.status == PASS:
        assert ideal.numbers["positions"] > 0 and ideal.numbers["max_difference"] <= 1e-4
    counts = report.result("counts").numbers
    assert counts["visual_per_layer"] == counts["planned"] and counts["kv_layers_checked"] > 0


@pytest.mark.matrix
@pytest.mark.parametrize("method", BUDGETED)  # pixelprune: tests/test_pixelprune.py
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_every_method_on_every_family(family_name, method):
    assert_check_passes(_run(family_name, method, skip=("timing",)), family_name)


def test_the_timing_check_reports_both_sides_and_the_ideal():
    timing = _run(skip=("full", "padded", "counts", "ideal", "modes", "restored")).result("timing")
    numbers = timing.numbers
    assert set(numbers["prefill_s"]) == {"unreduced", "reduced", "ideal"} and numbers["prefill_vs_ideal"] > 0
    assert set(numbers["generate_s"]) == {"unreduced", "reduced"}
    assert 0 < numbers["decoder_flops"] < numbers["decoder_flops_unreduced"]
    assert 0 < numbers["kv_bytes"] < numbers["kv_bytes_unreduced"]
    assert numbers["peak_memory_bytes"] == {"unreduced": None, "reduced": None}  # a CPU: not measured


# ----------------------------------------------------------------------------- planted faults
def _plant_hook(monkeypatch, make_hook):
    """Every attachment also registers ``make_hook(attachment)``'s hooks (removed with it)."""
    original = attachment.Attachment.__init__

    def init(self, reducer, model):
        original(self, reducer, model)
        self._handles.extend(make_hook(self, model))

    monkeypatch.setattr(attachment.Attachment, "__init__", init)


def _failed(report, key: str):
    result = report.result(key)
    assert result.status == FAIL, (key, result.detail)
    assert not report.ok
    return result


def test_full_fails_when_attaching_perturbs_the_decoder(monkeypatch):
    def nudge(module, args, kwargs):
        return (args[0] + 1e-3, *args[1:]), kwargs

    _plant_hook(monkeypatch, lambda a, model: [model.model.language_model.layers[0].register_forward_pre_hook(
        nudge, with_kwargs=True)])
    result = _failed(_run(method="full", skip=("timing", "modes")), "full")
    assert result.numbers["max_difference"] > 0 and not result.numbers["bit_identical"]


def test_full_on_a_cpu_fails_on_a_difference_below_the_tolerance(monkeypatch):
    """On a CPU ``full`` must be bit-identical: a nudge whose logit difference is far below the
    float32 tolerance (1e-4) still fails it."""
    from duet_vlm.check import TOLERANCE

    def nudge(module, args, kwargs):
        return (args[0] * (1 + 2**-20), *args[1:]), kwargs

    _plant_hook(monkeypatch, lambda a, model: [model.model.language_model.layers[0].register_forward_pre_hook(
        nudge, with_kwargs=True)])
    result = _failed(_run(method="full", skip=("timing", "modes", "padded", "counts", "ideal", "restored")), "full")
    assert 0 < result.numbers["max_difference"] < TOLERANCE[torch.float32] / 10
    assert result.numbers["tolerance"] == 0.0 and not result.numbers["bit_identical"]


def test_restored_fails_on_a_hook_left_behind(monkeypatch):
    original = attachment.Attachment.remove

    def remove(self):
        self._handles.pop(0)  # forgotten: never removed
        original(self)

    monkeypatch.setattr(attachment.Attachment, "remove", remove)
    model = FAMILIES["llava"].model()
    kinds = ("_forward_pre_hooks", "_forward_hooks")
    before = {(name, kind): set(getattr(m, kind)) for name, m in model.named_modules() for kind in kinds}
    try:
        assert "hooks left behind" in _failed(_run(skip=("timing", "modes", "padded", "ideal", "counts", "full")),
                                              "restored").detail
    finally:  # take the planted leftovers off the shared model
        for name, module in model.named_modules():
            for kind in kinds:
                hooks = getattr(module, kind)
                for key in set(hooks) - before[(name, kind)]:
                    del hooks[key]


def test_restored_fails_on_a_moved_weight(monkeypatch):
    model = FAMILIES["llava"].model()
    head = model.lm_head.weight

    def move(a, model):
        with torch.no_grad():
            head[0, 0] += 1.0
        return []

    _plant_hook(monkeypatch, move)
    original = head.detach().clone()
    try:
        result = _failed(_run(skip=("timing", "modes", "padded", "ideal", "counts", "full")), "restored")
        assert "weights changed: lm_head.weight" in result.detail
    finally:
        with torch.no_grad():
            head.copy_(original)


def test_padded_fails_when_padding_leaks_into_a_row(monkeypatch):
    def leak(module, args, kwargs):
        hidden = args[0]
        if hidden.shape[0] > 1:  # only in a batch: the first row reads what its neighbour holds
            hidden = hidden.clone()
            hidden[0] += 1e-2 * hidden[1].mean()
        return (hidden, *args[1:]), kwargs

    _plant_hook(monkeypatch, lambda a, model: [model.model.language_model.layers[1].register_forward_pre_hook(
        leak, with_kwargs=True)])
    result = _failed(_run(skip=("timing", "modes", "restored")), "padded")
    assert result.numbers["max_difference"] > result.numbers["tolerance"]


def _half(family_name: str, method: str, plant=None, monkeypatch=None):
    """The check in bfloat16 on a fresh copy of a family's tiny model (its modes left out)."""
    model, batch, rows = family_on(FAMILIES[family_name], torch.bfloat16)
    if plant is not None:
        _plant_hook(monkeypatch, plant)
    return check_model(model, batch, rows, method, ratio=0.5, rounds=1, new_tokens=3, skip=("timing", "modes"))


def test_padded_names_chosen_tokens_that_differ_and_half_precision_near_ties():
    """bfloat16 rounds the padded batch's scores apart from a row's: on Video-LLaVA under FastV one of
    row 1's 65 kept tokens falls the other way at the boundary. The check fails, names the row and
    the count, and says that float32 tells a near-tie from a fault; in float32 it passes."""
    result = _failed(_half("video_llava", "fastv"), "padded")
    assert "row 1: 1 of" in result.detail and "float32 tells it from a fault" in result.detail
    assert result.numbers["swapped"][1][0] == 1 and result.numbers["swapped"][0][0] == 0
    assert _run("video_llava", "fastv", skip=("timing", "modes")).result("padded").status == PASS


def test_padded_in_half_precision_fails_when_padding_leaks_into_a_row(monkeypatch):
    """The half-precision allowance (logits within 8x the unpatched model's own batch difference)
    does not absorb a row reading its neighbour."""
    def leak(module, args, kwargs):
        hidden = args[0]
        if hidden.shape[0] > 1:
            hidden = hidden.clone()
            hidden[0] += 0.5 * hidden[1].mean()
        return (hidden, *args[1:]), kwargs

    report = _half("llava", "duet", lambda a, model: [model.model.language_model.layers[1].register_forward_pre_hook(
        leak, with_kwargs=True)], monkeypatch)
    result = _failed(report, "padded")
    assert "differ in the batch" in result.detail or result.numbers["max_difference"] > result.numbers["tolerance"]


def test_counts_fails_when_the_statistics_disagree_with_the_plan(monkeypatch):
    original = record.item_stats

    def off_by_one(*args, **kwargs):
        stats = original(*args, **kwargs)
        stats.tokens_per_layer = [*stats.tokens_per_layer[:-1], stats.tokens_per_layer[-1] + 1]
        return stats

    monkeypatch.setattr(record, "item_stats", off_by_one)
    assert "plan" in _failed(_run(skip=("timing", "modes", "restored", "padded", "ideal")), "counts").detail


def test_ideal_fails_when_survivors_are_not_renumbered_after_a_boundary(monkeypatch):
    """DUET renumbers the survivors of a boundary (``positions="contiguous"``); the planted fault keeps
    their old positions, gaps and all (a constant shift would not be a fault: RoPE is relative)."""

    def not_moved_back(self, position_ids, rope_positions, step):
        kept = step.without_pads(step.gather_positions(position_ids))
        return kept, kept

    monkeypatch.setattr(positions.Renumbered, "after_boundary", not_moved_back)
    result = _failed(_run(skip=("timing", "modes", "restored", "padded", "counts")), "ideal")
    assert result.numbers["max_difference"] > result.numbers["tolerance"]


def _without_the_causal_mask(module, args, kwargs):
    """The last decoder layer's mask with no causal part: every query row but the last (which sees
    every key either way) reads later tokens."""
    hidden = args[0] if args else kwargs["hidden_states"]
    length = hidden.shape[1]
    kwargs["attention_mask"] = torch.zeros(hidden.shape[0], 1, length, length, dtype=hidden.dtype)
    return args, kwargs


def test_ideal_compares_every_position_not_only_the_last(monkeypatch):
    """A fault that leaves the last position alone (the one greedy decoding reads) and changes every
    other position's logits (those a fine-tuning loss reads): the last decoder layer attends without
    its causal mask under the reducer. The ideal check compares every position and fails."""
    family = FAMILIES["llava"]
    model = family.model()
    batch = family.batch(model)
    row = family.row(batch, 0)
    reducer = duet_vlm.make("duet", ratio=0.5)
    with torch.no_grad(), reducer(model):
        sound = model(**row).logits
    _plant_hook(monkeypatch, lambda a, model: [model.model.language_model.layers[-1].register_forward_pre_hook(
        _without_the_causal_mask, with_kwargs=True)])
    with torch.no_grad(), reducer(model):
        faulty = model(**row).logits
    assert torch.equal(faulty[:, -1], sound[:, -1]) and not torch.allclose(faulty[:, :-1], sound[:, :-1], atol=1e-3)
    result = _failed(_run(skip=("timing", "modes", "restored", "padded", "counts", "full")), "ideal")
    assert result.numbers["max_difference"] > 10 * result.numbers["tolerance"]
    # every position of each row's last layer was compared: its text and the visual tokens kept to the end
    positions = 0
    for b in range(batch["input_ids"].shape[0]):
        alone = family.row(batch, b)
        with torch.no_grad(), reducer(model):
            model(**alone)
        (item,) = reducer.stats.items
        positions += alone["input_ids"].shape[1] - item.tokens + item.tokens_per_layer[-1]
    assert result.numbers["positions"] == positions


def _break_static_caches(monkeypatch):
    """A static cache whose layers all keep the prompt's length (the buffers are not sized to what
    each layer holds)."""
    from duet_vlm.runtime import static

    monkeypatch.setattr(static, "size_layer", lambda layers, index, length, extra: None)


@pytest.mark.skipif(not compat.STATIC_UNDER_REDUCTION, reason="the planted fault is in a static cache, refused before 5.24")
def test_a_mode_fails_when_it_breaks(monkeypatch):
    _break_static_caches(monkeypatch)
    result = _failed(_run(skip=("timing", "restored", "padded", "counts", "ideal")), "mode:static_cache")
    assert "refused:" in result.detail or "tokens" in result.detail


def test_a_check_that_raises_is_a_failed_check(monkeypatch):
    import duet_vlm.check as check

    def broken(ctx):
        raise RuntimeError("planted")

    monkeypatch.setattr(check, "check_counts", broken)
    result = _failed(_run(skip=("timing", "modes", "restored", "padded", "ideal")), "counts")
    assert "planted" in result.detail


# ----------------------------------------------------------------------------- the command
def test_the_command_on_the_demo_model(tmp_path):
    out = tmp_path / "check.json"
    result = runner.invoke(cli.app, ["check", "--model", "demo", "--rounds", "1", "--json", str(out)],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "every check passed" in " ".join(result.output.split())
    assert max(len(line) for line in result.output.splitlines()) <= 80
    report = json.loads(out.read_text())
    assert report["ok"] and report["setup"]["family"] == "llava" and report["setup"]["attention"] == "sdpa"
    assert {"torch", "transformers", "cuda", "flash-attn", "gpu", "duet-vlm"} <= set(report["versions"])
    keys = [r["key"] for r in report["results"]]
    assert keys[:6] == ["model", "full", "padded", "counts", "ideal", "mode:no_cache"] and keys[-2:] == ["timing", "restored"]
    assert report["results"][keys.index("ideal")]["numbers"]["max_difference"] == 0.0  # bit for bit on a CPU


def test_the_recorded_command_names_paths_under_the_working_directory_relative_to_it(tmp_path, monkeypatch):
    """The report's command line is the one to run again from a checkout: ``--json`` given as an
    absolute path under the working directory is recorded relative to it (docs/check.md once quoted
    a GPU machine's scratch folder); an image outside it keeps its absolute path."""
    from PIL import Image

    checkout = tmp_path / "checkout"
    (checkout / "reports").mkdir(parents=True)
    monkeypatch.chdir(checkout)
    here = checkout.resolve()
    image = tmp_path / "elsewhere.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image)
    checks = ("full", "restored", "padded", "counts", "ideal", "modes", "timing")
    skips = [arg for check in checks for arg in ("--skip", check)]  # the report's command is what is read
    args = ["check", "--model", "demo", "--image", str(image.resolve()), *skips,
            "--json", str(here / "reports" / "r.json")]
    monkeypatch.setattr("sys.argv", ["duet-vlm", *args])
    result = runner.invoke(cli.app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    report = json.loads((here / "reports" / "r.json").read_text())
    assert report["setup"]["command"] == " ".join(
        ["duet-vlm", "check", "--model", "demo", "--image", str(image.resolve()), *skips, "--json", "reports/r.json"])


@pytest.mark.skipif(not compat.STATIC_UNDER_REDUCTION, reason="the planted fault is in a static cache, refused before 5.24")
def test_the_command_exits_1_on_a_failed_check(monkeypatch):
    _break_static_caches(monkeypatch)
    result = runner.invoke(cli.app, ["check", "--model", "demo", "--skip", "timing", "--skip", "padded"],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "1 failed" in " ".join(result.output.split())


@pytest.mark.parametrize("args, message", [
    (["--skip", "speed"], "the checks are full, restored"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--device", "cuda"], "torch sees no CUDA device"),
    (["--method", "nope"], "nope"),
    (["--budget", "0"], "budget"),
    (["--image", "a.png", "--image", "b.png", "--image", "c.png"], "at most two"),
])
def test_bad_options_are_refused_before_loading(args, message, monkeypatch):
    from transformers import AutoModelForImageTextToText

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", never)
    result = runner.invoke(cli.app, ["check", "--model", "demo", *args])
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())


def test_the_command_on_a_tiny_llava_next_checkpoint(tmp_path):
    """Through the processor: two images of different aspects become anyres items of different sizes
    (336 and 272 slots here); every check passes at a ratio. A budget the method cannot meet on those
    four decoder layers is refused in one line before any check runs."""
    from duet_vlm.tiny.checkpoints import write_llava_next

    folder = write_llava_next(tmp_path / "next")
    result = runner.invoke(cli.app, ["check", "--model", str(folder), "--ratio", "0.5", "--rounds", "1",
                                     "--json", str(tmp_path / "r.json")], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["setup"]["family"] == "llava_next" and report["ok"]
    refused = runner.invoke(cli.app, ["check", "--model", str(folder), "--budget", "64"])
    assert refused.exit_code == 1
    assert "duet cannot run on row 0 of the check's inputs: no schedule" in " ".join(refused.output.split())
