"""duet-vlm inside vLLM: a ``vllm.general_plugins`` plugin (``plugin.register``) whose model classes
cut visual tokens before the language model with the project's own method code.

Importing this package imports no vLLM module; ``options`` (what servers and requests ask for) and
``select`` (the selection glue) are pure. README, "Serving with vLLM".
"""
