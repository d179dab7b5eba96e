"""The lmms-eval models ``duet_qwen2_vl``, ``duet_qwen2_5_vl`` and ``duet_qwen3_vl``: lmms-eval's
Qwen-VL classes with a reducer attached (``model_args`` and statistics as in ``lmms_eval_models``).

**Until duet-vlm has a Qwen-VL adapter, these models load the checkpoint and then stop with the
reducer's ``TypeError`` at attach ("duet-vlm cannot attach to Qwen2_5_VLForConditionalGeneration:
pass the LlavaForConditionalGeneration, ..."), which names the supported classes**: Qwen's M-RoPE
positions and its merged patch grid are family knowledge an adapter in ``duet_vlm.adapters`` must
supply. They are registered now so that the commands stay the same when it lands.

Kept apart from ``lmms_eval_models`` so that the other models do not import lmms-eval's Qwen
modules. Those need ``qwen-vl-utils``, which imports torchvision: they run on a GPU machine's
install (README), not with the CPU-only install, where lmms-eval warns at import and generation fails.

    lmms-eval --model duet_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=duet,ratio=0.25 --tasks mme
"""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

from .lmms_eval_models import ReducerMixin


class DuetQwen2VL(ReducerMixin, Qwen2_VL):
    """lmms-eval's ``qwen2_vl`` (a "simple" model) with a reducer attached; refused at attach until
    the Qwen-VL adapter lands (module docstring).

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_qwen2_vl", tasks=["mme"],                        # doctest: +SKIP
    ...                 model_args="pretrained=Qwen/Qwen2-VL-7B-Instruct,method=duet,ratio=0.25")
    """


class DuetQwen2_5_VL(ReducerMixin, Qwen2_5_VL):
    """lmms-eval's chat ``qwen2_5_vl`` with a reducer attached; refused at attach until the Qwen-VL
    adapter lands (module docstring).

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_qwen2_5_vl", tasks=["mme"],                      # doctest: +SKIP
    ...                 model_args="pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=duet,ratio=0.25")
    """


class DuetQwen3VL(ReducerMixin, Qwen3_VL):
    """lmms-eval's chat ``qwen3_vl`` (dense and MoE checkpoints) with a reducer attached; refused at
    attach until the Qwen-VL adapter lands (module docstring).

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_qwen3_vl", tasks=["mme"],                        # doctest: +SKIP
    ...                 model_args="pretrained=Qwen/Qwen3-VL-8B-Instruct,method=duet,ratio=0.25")
    """
