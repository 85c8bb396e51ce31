"""What the ``lalora`` subcommands share: exit codes, ``UsageError``, ``add_command`` (a subparser with its
``examples:`` epilog) and the flag groups several commands take (the LoRA setup, the data)."""
from __future__ import annotations

import textwrap

#: 0 success; 1 a failure while running; 2 bad arguments, paths or input files; 130 interrupted
#: (141, stdout closed by the reader: ``lalora.cli.output.EXIT_PIPE``)
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130


class UsageError(Exception):
    """A bad argument, path or input file (exit code 2)."""


def examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def add_command(sub, name, run, fmt, example_lines, *, help, description=None, extra=None, check=None,
                vocabulary=None):
    """A subcommand with its ``examples:`` epilog (plus an ``extra`` paragraph) that runs ``run(args)``.

    ``check(args)``, when given, validates the flags before anything is loaded (``main`` runs it first);
    ``vocabulary(args, flags)``, when given, says how library messages are worded for this command
    (``lalora.cli.vocab.Vocabulary``; default: the command's flags)."""
    epilog = examples(example_lines) + (f"\n\n{extra}" if extra else "")
    p = sub.add_parser(name, help=help, description=description, formatter_class=fmt, epilog=epilog)
    p.set_defaults(func=run, check=check, vocabulary=vocabulary)
    return p


def lora_flags(p) -> None:
    g = p.add_argument_group("LoRA (ignored with --adapter)")
    g.add_argument("--adapter", help="existing peft adapter directory to wrap the model with")
    g.add_argument("--rank", type=int, help="LoRA rank r (default 8, or the precision's)")
    g.add_argument("--alpha", type=float, help="lora_alpha (default 2r)")
    g.add_argument("--targets", help="comma-separated target module names (default all-linear)")
    g.add_argument("--init", help="init_lora_weights: orthogonal (default; avoids zero curvature of A), gaussian, true")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init (default 0)")


def data_flags(p) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch (default 8)")
    p.add_argument("--max-length", type=int, default=256, help="truncate examples to this many tokens (default 256)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32 (default), bfloat16")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (lalora's, transformers', huggingface_hub's) and no library info logs")


def form_flag(p) -> None:
    """``--form``, the penalty form (``LaLoRARegularizer(form=)``)."""
    p.add_argument("--form", default="auto", choices=["auto", "linearized", "effective-weight"],
                   help="penalty form (default auto: effective-weight for kfac/tri-kfac precisions, else linearized, the paper's)")
