"""The served families under vLLM, one module each: vLLM's model class with what the family says
differently (its items' geometry, its tower's taps, its decoder layers' ``language.scheme``) and its
processor. Which architectures they are, and their names, are ``registry.FAMILIES``'s.
"""
