"""The loomlens command line: a thin layer over the stages.

Every command takes plain flags (`--data DIR`) or ultralytics-style `key=value` words
(`data=DIR`); both spellings are equivalent. Heavy imports happen inside each command so
that `loomlens --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="loomlens",
    help="Fine-tune Florence-2 with LoRA to find fabric defects, and run it on the line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _expand_key_value_args(argv: list[str]) -> list[str]:
    """Turn `key=value` words into `--key value` (ultralytics style); leave the rest alone."""
    out: list[str] = []
    for arg in argv:
        if not arg.startswith("-") and "=" in arg:
            key, value = arg.split("=", 1)
            if key and key.replace("_", "").replace("-", "").isalnum():
                out += [f"--{key.replace('_', '-')}", value]
                continue
        out.append(arg)
    return out


def main() -> None:
    """Console-script entry point."""
    sys.argv = [sys.argv[0], *_expand_key_value_args(sys.argv[1:])]
    app()


if __name__ == "__main__":
    main()
