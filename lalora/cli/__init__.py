"""The ``lalora`` command line: ``backends``, ``fit``, ``inspect``, ``compare``, ``finetune``, ``sweep``, ``bench``,
``eval``.

Exit codes: 0 success; 2 bad arguments, paths or input files (the message names the one at
fault); 1 a failure while running; 130 interrupted; 141 stdout closed by the reader (``| head``).
Library messages are shown in CLI words (``lalora.cli.vocab``): flags, not Python arguments.

The package, top to bottom (a module imports only modules below it, and the library):

- ``__init__``: ``main``, the parser (each subcommand adds its own), running a command;
- ``backends``, ``fit``, ``inspect``, ``compare``, ``finetune``, ``sweep``, ``bench``, ``eval``: one subcommand each
  (``add_parser``: its flags; ``check``: the flags, before anything is loaded; ``run``);
- ``fit_source``: ``lalora fit``'s source data, ``--data FILE`` or ``--source-from-model N``;
- ``inputs``: what the commands read (data files, model directories, LoRA setups, backend options);
- ``output`` (the terminal), ``vocab`` (library messages in CLI words), ``common`` (exit codes,
  ``UsageError``, ``add_command``, the shared flag groups).
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import DataError, PrecisionFileError
from ..version import __version__
from . import backends, bench, compare, eval, finetune, fit, inspect, sweep
from .common import EXIT_FAIL, EXIT_INTERRUPT, EXIT_OK, EXIT_USAGE, UsageError, examples  # noqa: F401 (EXIT_OK)
from .output import quiet_libraries, stdout_closed
from .vocab import Vocabulary, speaking, to_cli

#: in ``lalora --help`` order
SUBCOMMANDS = (backends, fit, inspect, compare, finetune, sweep, bench, eval)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="lalora", formatter_class=fmt,
                                 description="LaLoRA: keep what a model knew while fine-tuning it with LoRA.",
                                 epilog=examples("""
                                     lalora backends
                                     lalora fit --model ./base --data source.jsonl --backend kfac --out p.lalora
                                     lalora inspect p.lalora
                                     lalora compare diag.lalora kfac.lalora --reference reference-ef.lalora
                                     lalora finetune --model ./base --data task.jsonl --precision p.lalora --strength 1e3 --out adapter/
                                     lalora sweep --model ./base --precision p.lalora --data task.jsonl --target-eval t.jsonl --source-eval s.jsonl --out sweep.json
                                     lalora bench --quick
                                     lalora eval --model ./base --adapter adapter/ --tasks lalora_source,lalora_arithmetic
                                 """) + "\n\nexit codes: 0 ok, 1 failure while running, 2 bad arguments/paths/files, 130 interrupted, "
                                        "141 stdout closed by the reader (e.g. | head)")
    ap.add_argument("--version", action="version", version=f"lalora {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(sub, fmt)
    return ap


def _vocabulary(parser, args) -> Vocabulary:
    """How library messages are worded for this command: its flags (and, where the command says so through
    ``add_command(vocabulary=...)``, its backends' options)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {name: {s for action in p._actions for s in action.option_strings} for name, p in sub.choices.items()}
    if args.vocabulary is not None:
        return args.vocabulary(args, flags)
    return Vocabulary(args.command, flags, non_strict=bool(getattr(args, "non_strict", False)))


def _run(args) -> int:
    try:
        with quiet_libraries(bool(getattr(args, "quiet", False))):
            if args.check is not None:
                args.check(args)
            code = args.func(args)
        sys.stdout.flush()  # a closed stdout shows here at the latest
        return code
    except BrokenPipeError:  # the reader went away (| head): stop quietly, like Unix tools
        return stdout_closed()
    except UsageError as e:
        print(f"lalora {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, PrecisionFileError) as e:
        print(f"lalora {args.command}: error: {to_cli(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lalora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as e:  # noqa: BLE001 - report, exit 1
        if os.environ.get("LALORA_DEBUG"):
            raise
        print(f"lalora {args.command}: failed: {type(e).__name__}: {to_cli(e)} (set LALORA_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_FAIL


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself ignores a closed stdout for --help (exit 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    with speaking(_vocabulary(parser, args)):
        return _run(args)
