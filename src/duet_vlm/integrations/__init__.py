"""Integrations with evaluation frameworks; each lives in its own module and is imported on demand.

``lmms_eval_models.DuetLlavaHf`` is the lmms-eval model ``duet_llava_hf`` (install the
``lmms-eval`` extra as the README says); lmms-eval finds it through the entry point that
``lmms_eval_manifest`` declares.
"""
