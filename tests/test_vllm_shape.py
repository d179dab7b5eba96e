"""The vLLM plugin's shape, checked without vLLM (#77 item 1): the served families in one registry
every list is made from, the decoder layers' schemes (what the hooks ask of a layer, and layers of
another kind refused by name), the runner reaching the model through its declared protocol only,
and the dropped counts made in one place. What needs vLLM's classes is in tests/test_vllm_units.py.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from duet_vlm.integrations.vllm import options, plugin, refused, registry, served
from duet_vlm.integrations.vllm.language import checks, protocol, scheme, steps

PACKAGE = Path(registry.__file__).parent


def test_every_list_of_served_families_is_the_registrys():
    """The classes vLLM registers, the families a refused server is told of, and the families and
    methods a server without duet-vlm's worker is told drop inside the language model: each made
    from the registry (the options message once omitted Qwen3.5-MoE, which is served)."""
    assert {arch: target for arch, target in plugin.MODELS.items() if arch != "TransformersMultiModalForCausalLM"} \
        == {family.architecture: family.target for family in registry.FAMILIES}
    for family in registry.FAMILIES:
        assert family.name in refused.SERVED
        module, cls = family.target.split(":")
        path = PACKAGE / "families" / f"{module.rpartition('.')[2]}.py"
        classes = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)}
        assert cls in classes, family  # (the module's class, read without importing vLLM)
    language = [family.name for family in registry.FAMILIES if family.language]
    assert "Qwen3.5-MoE" in language and "Gemma 4" in language
    with pytest.raises(options.RefusedMethod) as refusal:
        options.check_supported(options.make("fastv", budget=64))
    message = str(refusal.value)
    assert registry.named(language=True) in message and all(name in message for name in language)
    served_names = served.language_methods()
    assert {"fastv", "duet", "pyramiddrop", "sparsevlm", "holitom", "dart", "vscan", "random_horizon", "v2drop", "apet"} == set(served_names)
    assert ", ".join(served_names) in message


def test_a_class_finds_its_family_through_its_bases():
    """A family's name and whether it drops inside the language model are the registry's, for its
    class and for a class derived from it; a class of no family has none."""
    gemma3 = type("DuetGemma3ForConditionalGeneration", (), {"__module__": f"{registry.PACKAGE}.gemma3"})
    derived = type("Mine", (gemma3,), {})
    assert registry.of(gemma3).name == registry.of(derived).name == "Gemma 3"
    assert registry.of(type("Other", (), {})) is None


def test_the_runner_reaches_the_model_through_its_declared_protocol_only():
    """Every member of the model the runners' and the KV groups' code reads (``model.x``,
    ``self.model.x``) is one ``DroppingModel`` declares, and steps (the step's plan) calls the model
    for nothing: an undeclared member planted in a runner fails here."""
    declared = {name for name, _ in inspect.getmembers(protocol.DroppingModel, inspect.isfunction)
                if not name.startswith("__")}
    assert declared == {"duet_language_stages", "duet_boundaries", "duet_attention_layer_names", "duet_request_plan"}

    def is_model(node) -> bool:  # ``model`` or ``self.model``
        return isinstance(node, ast.Name) and node.id == "model" or \
            isinstance(node, ast.Attribute) and node.attr == "model" and isinstance(node.value, ast.Name)

    used, probes = set(), []
    for module in ("runners", "kv", "steps"):
        tree = ast.parse((PACKAGE / "language" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_model(node.value):
                used.add((module, node.attr))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                    and is_model(node.args[0]):
                probes.append((module, node.lineno))
    assert {attr for _, attr in used} <= declared, used
    assert not [attr for module, attr in used if module == "steps"] and probes == []


def test_the_hooks_ask_the_scheme_not_the_layers():
    """The hooks probe no layer (no ``hasattr``/``getattr`` in ``hooks``): what a layer takes, which
    layers score and slide, and how they compute queries and keys are its scheme's."""
    tree = ast.parse((PACKAGE / "language" / "hooks.py").read_text())
    probes = [node.lineno for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")]
    assert probes == []


# ---------------------------------------------------------------- the decoder layers' schemes
class _Attention(nn.Module):
    """What vLLM's ``Attention`` shows the schemes."""

    def __init__(self, name: str, window=None, shares=None) -> None:
        super().__init__()
        self.layer_name, self.sliding_window, self.kv_sharing_target_layer_name = name, window, shares


class _SelfAttention(nn.Module):
    def __init__(self, index: int, heads: int, kv_heads: int, head_dim: int, normed: bool, window=None, shares=None):
        super().__init__()
        self.head_dim, self.q_size, self.kv_size = head_dim, heads * head_dim, kv_heads * head_dim
        self.qkv_proj = _Pair(nn.Linear(8, self.q_size + 2 * self.kv_size, bias=False))
        self.attn = _Attention(f"model.layers.{index}.self_attn.attn", window, shares)
        if normed:
            self.q_norm, self.k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
        self.rotary_emb = lambda positions, q, k: (q * (1 + positions[:, None]), k * (1 + positions[:, None]))


class _Pair(nn.Module):
    """A vLLM linear layer: ``(output, bias)``."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x), None


class _Norm(nn.Module):
    """vLLM's fused norm: with a residual, ``(normed(x + residual), x + residual)``, written in place."""

    def forward(self, x, residual=None):
        if residual is None:
            return x.mul_(2)
        residual.add_(x)
        return residual * 2, residual


def _decoder(layers: int = 3, normed: bool = False, windows=(), shares=None) -> nn.Module:
    decoder = nn.Module()
    decoder.layers = nn.ModuleList()
    for index in range(layers):
        layer = nn.Module()
        layer.self_attn = _SelfAttention(index, 4, 2, 2, normed, 4 if index in windows else None,
                                         (shares or {}).get(index))
        layer.input_layernorm = _Norm()
        decoder.layers.append(layer)
    decoder.norm = nn.Identity()
    return decoder


def test_each_scheme_computes_queries_and_keys_as_its_layers_do():
    """A scheme's queries and keys of a layer's input: the layer's input norm (with the residual stream
    added, on copies: the inputs unchanged), its ``qkv_proj``, its per-head norms where its kind has
    them, its rotation; which layers slide and what vLLM names them."""
    torch.manual_seed(0)
    hidden, residual, positions = torch.randn(5, 8), torch.randn(5, 8), torch.arange(5.0)
    kept = hidden.clone(), residual.clone()
    for kind, normed in ((scheme.PlainLayers, False), (scheme.NormedLayers, True)):
        decoder = _decoder(normed=normed, windows={1})
        layers = kind(decoder, "test")
        q, k = layers.queries_and_keys(2, positions, hidden, residual)
        attn = decoder.layers[2].self_attn
        qkv = attn.qkv_proj.linear((hidden + residual) * 2)
        want_q, want_k, _ = qkv.split([8, 4, 4], dim=-1)
        if normed:
            want_q = attn.q_norm(want_q.reshape(5, 4, 2)).reshape(5, 8)
            want_k = attn.k_norm(want_k.reshape(5, 2, 2)).reshape(5, 4)
        torch.testing.assert_close(q, want_q * (1 + positions[:, None]))
        torch.testing.assert_close(k, want_k * (1 + positions[:, None]))
        assert torch.equal(hidden, kept[0]) and torch.equal(residual, kept[1])
        assert [layers.window(index) for index in range(3)] == [None, 4, None]
        assert layers.layer_name(1) == "model.layers.1.self_attn.attn" and layers.per_layer_input is None


def test_layers_of_another_kind_than_the_scheme_are_refused_by_name():
    """Per-head norms under the plain scheme, none under the normed one, a layer without softmax
    attention where no linear one stands: refused, naming the layer and the model, not scored
    as another kind's (the hooks once probed each layer and would have skipped a missing norm)."""
    with pytest.raises(checks.StageNotServed, match="decoder layer 0 of this llama model norms its queries"):
        scheme.PlainLayers(_decoder(normed=True), "llama")
    with pytest.raises(checks.StageNotServed, match="has no per-head norms"):
        scheme.NormedLayers(_decoder(normed=False), "qwen3")
    bare = _decoder()
    for layer in bare.layers:
        layer.self_attn._project_qkv_gate = nn.Identity()  # (Qwen3.5's attention layers)
    del bare.layers[1].self_attn
    with pytest.raises(checks.StageNotServed, match="decoder layer 1 .* neither softmax nor linear attention"):
        scheme.GatedLayers(bare, "qwen3_5_text")
    bare.layers[1].linear_attn = nn.Identity()  # a Gated-DeltaNet layer: it does not score
    assert scheme.GatedLayers(bare, "qwen3_5_text").attention(1) is None
    assert type(scheme.scheme_for(SimpleNamespace(model_type="qwen3"), _decoder(normed=True))) is scheme.NormedLayers
    assert type(scheme.scheme_for(SimpleNamespace(model_type="llama"), _decoder())) is scheme.PlainLayers
    assert scheme.SCHEMES["qwen3_5_moe_text"] is scheme.GatedLayers and scheme.SCHEMES["gemma3_text"] is scheme.NormedLayers


def test_gemma_4s_scheme_knows_its_per_layer_inputs_and_the_layers_that_reuse_keys_and_values():
    """Gemma 4's layers: each takes a per-layer input (read for the held rows after a boundary), and a
    layer that reuses an earlier layer's keys and values has only a query projection and norm; the
    scheme names the layers it reads, and a reusing layer that projects keys of its own, or a storing
    one without them, is refused."""
    decoder = _decoder(normed=True, shares={2: "model.layers.0.self_attn.attn"})
    shared = decoder.layers[2].self_attn
    shared.q_proj = shared.qkv_proj
    del shared.qkv_proj, shared.k_norm
    layers = scheme.scheme_for(SimpleNamespace(model_type="gemma4_text"), decoder)
    assert type(layers) is scheme.PerLayerInputLayers and layers.per_layer_input == "per_layer_input"
    assert layers.shares_kv() == {2: "model.layers.0.self_attn.attn"}
    del decoder.layers[1].self_attn.k_norm
    with pytest.raises(checks.StageNotServed, match="decoder layer 1 of this gemma4_text model has no k_norm"):
        scheme.PerLayerInputLayers(decoder, "gemma4_text")
    unshared = _decoder(normed=True)
    unshared.layers[2].self_attn.attn.kv_sharing_target_layer_name = "model.layers.0.self_attn.attn"
    with pytest.raises(checks.StageNotServed, match="decoder layer 2 .* has no q_proj"):
        scheme.PerLayerInputLayers(unshared, "gemma4_text")
    assert scheme.NormedLayers(_decoder(normed=True), "gemma3_text").shares_kv() == {}


# ---------------------------------------------------------------- the dropped counts, made once
def test_a_requests_dropped_tokens_are_made_in_one_place():
    """What a request no longer holds in each layer, from its items' held tokens: the runner's
    (``RequestPlan.dropped``) and the scheduler's (``memory.request_drops``, in the vLLM suite) are
    one function's, checked against a sum written out."""
    held = [[576, 576, 64, 64, 32], [90, 90, 90, 10, 0]]
    plans = tuple(SimpleNamespace(schedule=SimpleNamespace(tokens_per_layer=tokens)) for tokens in held)
    plan = steps.RequestPlan(800, ((10, 576), (600, 90)), plans)
    assert plan.dropped == tuple(576 - a + 90 - b for a, b in zip(*held)) == (0, 0, 512, 592, 634)
    assert plan.dropped == options.dropped_tokens([(576, held[0]), (90, held[1])])
    assert options.dropped_tokens([], 3) == (0, 0, 0)
    with pytest.raises(ValueError, match="tokens for 2 decoder layers, the model has 5"):
        options.dropped_tokens([(576, held[0]), (90, [90, 0])])
