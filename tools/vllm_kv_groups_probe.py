"""Probe of vLLM 0.32's KV-cache grouping with synthetic layer specs (no model, no server, under 10 s):
what docs/guides/vllm-stage-b.md's rows on the spec registry and grouping rest on (#53).

    ~/.cache/duet-vlm/vllm-venv/bin/python tools/vllm_kv_groups_probe.py

It checks that a spec subclassing ``FullAttentionSpec`` folds every layer back into one group while a
subclass of ``AttentionSpec`` gets groups of its own; that registering a plugin spec before the
built-ins leaves them unregistered until ``register_all_kvcache_specs`` runs (the engine core calls
it unconditionally); and how many groups FastV's, DUET's and PyramidDrop's boundaries give on a
32-layer decoder (each segment's spec comparing unequal through its ``segment`` field).
"""
import torch, dataclasses
from dataclasses import dataclass
from vllm.v1.kv_cache_interface import FullAttentionSpec, AttentionSpec, UniformTypeKVCacheSpecs
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry, _REGISTRY_KVCACHESPEC_LIST
import vllm.v1.core.kv_cache_utils as U
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, register_all_kvcache_specs
from vllm.utils.math_utils import cdiv

@dataclass(frozen=True, kw_only=True)
class SubFull(FullAttentionSpec):
    segment: int = 1

@dataclass(frozen=True, kw_only=True)
class Tail(AttentionSpec):
    segment: int = 1
    def max_memory_usage_bytes(self, vllm_config):
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

# Trap 2: register plugin spec first
KVCacheSpecRegistry.register(Tail, FullAttentionManager)
KVCacheSpecRegistry._ensure_registered(None)
print("after plugin-first register, FullAttentionSpec registered?", FullAttentionSpec in _REGISTRY_KVCACHESPEC_LIST)
register_all_kvcache_specs(None)   # what EngineCore._initialize_kv_caches does unconditionally
print("after register_all_kvcache_specs:", FullAttentionSpec in _REGISTRY_KVCACHESPEC_LIST)
KVCacheSpecRegistry.register(SubFull, FullAttentionManager)

kw = dict(block_size=128, num_kv_heads=4, head_size=64, dtype=torch.float16)
def specs(K, L, cls, seg_of=lambda i: 1):
    d = {}
    for i in range(L):
        d[f"l{i}"] = FullAttentionSpec(**kw) if i < K else cls(segment=seg_of(i), **kw)
    return d
for name, cls in [("SubFull", SubFull), ("Tail(AttentionSpec)", Tail)]:
    s = specs(2, 32, cls)
    print(name, "uniform:", U.is_kv_cache_spec_uniform(s), "uniform_type:", UniformTypeKVCacheSpecs.from_specs(s) is not None)
def groups(s):
    g = U._get_kv_cache_groups_uniform_page_size(s)
    return [(type(x.kv_cache_spec).__name__, len(x.layer_names)) for x in g]
for K in (2, 3, 14, 16, 20):
    print("FastV K=%d:" % K, groups(specs(K, 32, Tail)))
print("DUET 16/24:", groups(specs(16, 32, Tail, lambda i: 1 if i < 24 else 2)))
print("PDrop 8/16/24:", groups(specs(8, 32, Tail, lambda i: 1 + (i - 8) // 8)))
print("Tail MRO manager:", KVCacheSpecRegistry.get_manager_class(Tail(**kw)).__name__)
