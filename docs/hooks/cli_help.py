"""mkdocs hook: replace ``<!-- lalora-help: COMMAND -->`` in a page with ``lalora COMMAND --help``.

The CLI reference is generated from the argparse parser itself (``lalora.cli.build_parser``),
so it cannot drift from the code. ``<!-- lalora-help: -->`` (empty) gives ``lalora --help``.
"""
from __future__ import annotations

import argparse
import os
import re

_MARK = re.compile(r"<!--\s*lalora-help:\s*([\w-]*)\s*-->")


def _help(command: str) -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: make it fixed
    from lalora.cli import build_parser

    parser = build_parser()
    if not command:
        return parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if command not in action.choices:
                raise ValueError(f"docs: <!-- lalora-help: {command} -->: no such command; "
                                 f"commands are {sorted(action.choices)}")
            return action.choices[command].format_help()
    raise ValueError("docs: the lalora parser has no sub-commands")


def on_page_markdown(markdown, page, **kwargs):
    if "lalora-help:" not in markdown:
        return markdown
    return _MARK.sub(lambda m: "```text\n" + _help(m.group(1)).rstrip() + "\n```", markdown)
