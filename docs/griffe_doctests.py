"""A griffe extension for the site's API pages: the docstrings' doctest lines (``>>> ...`` and what
follows them up to a blank line) become ``pycon`` code blocks, without their ``# doctest:`` flags.

The docstrings are written for readers of the source and for ``pytest --doctest-modules``; Markdown
would read a bare ``>>>`` as three nested quotes. mkdocs.yml loads this file
(``extensions: [docs/griffe_doctests.py]``); it changes what the site shows, never the source.

>>> fence("Keeps a few.\\n\\n>>> make('duet', budget=64)   # doctest: +SKIP\\nDuet(...)\\n").split("\\n")
['Keeps a few.', '', '```pycon', ">>> make('duet', budget=64)", 'Duet(...)', '```', '']
"""

from __future__ import annotations

import re

import griffe

FLAGS = re.compile(r"\s*#\s*doctest:.*$")


def fence(text: str) -> str:
    """``text`` with every run of doctest lines in a fenced ``pycon`` block at the run's indentation."""
    out, run, indent = [], [], ""
    for line in text.split("\n") + [""]:
        stripped = line.lstrip()
        if not run and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
        if stripped.startswith(">>>") or (run and stripped):
            run.append(FLAGS.sub("", line[len(indent):] if line.startswith(indent) else stripped))
            continue
        if run:
            out += [f"{indent}```pycon", *(indent + r for r in run), f"{indent}```"]
            run = []
        out.append(line)
    return "\n".join(out[:-1])


class DoctestFences(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence(obj.docstring.value)
