"""The ``duet-vlm`` command line (``duet-vlm = "duet_vlm.cli:main"``): ``commands`` parses each
command's options and calls one library function, ``printing`` prints its result through the
``tables`` that fit the terminal, ``progress`` draws the progress bars.

Importing it imports no torch of its own: each command imports the library it calls when it runs.
"""

from .commands import METHOD_NAMES, USER_ERRORS, app, expand_list_options, main
from .tables import (
    Column, Fitted, Layout, accuracy_table, answers_table, batch_rows_table, check_table, end_to_end_tables, family_table,
    layer_groups, prefill_table, reproduce_table, vision_table,
)

__all__ = [
    "METHOD_NAMES", "USER_ERRORS", "Column", "Fitted", "Layout", "accuracy_table", "answers_table", "app", "batch_rows_table",
    "check_table", "end_to_end_tables", "expand_list_options", "family_table", "layer_groups", "main", "prefill_table",
    "reproduce_table", "vision_table",
]
