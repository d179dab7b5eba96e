"""The lmms-eval models ``duet_qwen2_vl``, ``duet_qwen2_5_vl``, ``duet_qwen3_vl`` and ``duet_qwen3_5``: lmms-eval's
Qwen-VL classes with a reducer attached (``model_args`` and statistics as in ``lmms_eval_models``).

Kept apart from ``lmms_eval_models`` so that the other models do not import lmms-eval's Qwen
modules. Their generation calls ``qwen_vl_utils.process_vision_info``, and ``qwen-vl-utils``
imports torchvision (so do transformers' Qwen video processors): they run on a GPU machine's
install (README), not with the CPU-only one, where lmms-eval warns at import and generation fails.

    lmms-eval --model duet_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=duet,ratio=0.25 --tasks mme
"""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.chat.qwen3_5 import Qwen3_5
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

from .lmms_eval_models import ReducerMixin


class DuetQwen2VL(ReducerMixin, Qwen2_VL):
    """lmms-eval's ``qwen2_vl`` (a "simple" model) with a reducer attached.

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_qwen2_vl", tasks=["mme"],                        # doctest: +SKIP
    ...                 model_args="pretrained=Qwen/Qwen2-VL-7B-Instruct,method=duet,ratio=0.25")
    """


class DuetQwen2_5_VL(ReducerMixin, Qwen2_5_VL):
    """lmms-eval's chat ``qwen2_5_vl`` with a reducer attached.

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_qwen2_5_vl", tasks=["mme"],                      # doctest: +SKIP
    ...                 model_args="pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=duet,ratio=0.25")
    """


class DuetQwen3VL(ReducerMixin, Qwen3_VL):
    """lmms-eval's chat ``qwen3_vl`` with a reducer attached (dense Qwen3-VL; Qwen3.5 checkpoints it
    also loads are served too). Qwen3-VL MoE (``...-A3B-...``), whose model type duet-vlm's adapters
    do not list, is refused at attach with a ``TypeError`` naming the supported classes.

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_qwen3_vl", tasks=["mme"],                        # doctest: +SKIP
    ...                 model_args="pretrained=Qwen/Qwen3-VL-8B-Instruct,method=duet,ratio=0.25")
    """


class DuetQwen3_5(ReducerMixin, Qwen3_5):
    """lmms-eval's chat ``qwen3_5`` (Qwen3.5 and Qwen3.5-MoE, hybrid linear-attention language
    models) with a reducer attached.

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_qwen3_5", tasks=["mme"],                         # doctest: +SKIP
    ...                 model_args="pretrained=Qwen/Qwen3.5-4B,method=duet,ratio=0.25")
    """
