"""The command line's progress display."""

from __future__ import annotations

from typing import Optional

from rich.progress import Progress

from . import printing


class Bar:
    """A rich progress display drawn from its first report on (a command that fails first draws none),
    one task per label."""

    def __init__(self, transient: bool = True):
        self.progress = Progress(console=printing.console, transient=transient)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tasks:
            self.progress.stop()

    def task(self, label: str, total: Optional[int]) -> int:
        if not self.tasks:
            self.progress.start()
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total)
        return self.tasks[label]

    def rounds(self, total: int):
        """``report(label)``: one more of ``total`` rounds of the task ``label``."""
        return lambda label: self.progress.advance(self.task(label, total))

    def counter(self, label: str):
        """``report(advance, description=None, total=None)`` of the one task ``label``."""
        return lambda advance, description=None, total=None: self.progress.update(
            self.task(label, total), advance=advance, description=description, total=total)
