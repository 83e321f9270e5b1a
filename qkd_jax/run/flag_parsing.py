"""absl flag parsing for the run command lines (`python -m qkd_jax.main`, `python -m qkd_jax.demo`):
`--help` prints the command's usage and flags (exit 0), and the flag errors config_flags reports
as tracebacks become one line (exit 1).

Each command passes its module docstring and name: `app.run(main, flags_parser=flags_parser(__doc__, __name__))`.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags

HELP_ARGS = ("--help", "-help", "-h", "--h", "-?", "--helpshort")


def print_help(doc: str, module: str) -> None:
    """`doc` and the flags `module` defines, on stdout (absl's --help exits 1 and, run through a
    `python -m qkd_jax.X` shim, lists no flags)."""
    sys.stdout.write(f"{doc.strip()}\n\nflags:\n{flags.FLAGS.module_help(module)}\n")


def _config_spec(argv: list[str]) -> str:
    """The value of --config on the command line ('' when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _config_file_error(spec: str, message: str) -> str:
    """One line for a config file that cannot be loaded (config_flags reports a traceback)."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        return f"--config={spec}: no config file {path!r} (paths are relative to the current directory)"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if line.split(":")[0].endswith(("Error", "Exception"))),
                 lines[-1] if lines else "")
    if variant and cause.startswith("TypeError") and "positional argument" in cause:
        return f"--config={spec}: {path} has no variants; drop ':{variant}'"
    return f"--config={spec}: {cause}"


def _key_error_text(err: BaseException) -> str:
    """The text of a (possibly wrapped) KeyError: ml_collections raises AttributeError(KeyError(msg))."""
    while err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    return str(err.args[0]) if err.args else str(err)


def parse_flags(argv: list[str], doc: str, module: str) -> list[str]:
    """absl's flag parsing (--help: `doc` and the flags of `module`, exit 0), with one line (exit 1)
    for the errors config_flags reports as tracebacks: an override of a config key that does not
    exist (with ml_collections' "Did you mean" suggestion) and a config file that is missing or
    whose get_config(ARG) fails."""
    if any(a in HELP_ARGS for a in argv[1:]):
        print_help(doc, module)
        sys.exit(0)
    spec = _config_spec(argv)
    try:
        if spec and not os.path.isfile(spec.partition(":")[0]):  # config_flags fails late, with a traceback
            raise flags.Error("config file")
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as err:
        text = _key_error_text(err)
        missing, _, hint = text.partition("\n")
        missing = missing.strip("\"'")
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [o for o in overrides if missing in o.split(".")[1:]]
        if not named:
            raise
        hint = f" {hint.strip()}" if hint.strip() else ""
        message = (f"--{named[0]}: unknown config key '{named[0].split('.', 1)[1]}' (no field {missing!r})."
                   f"{hint} Check the spelling against the config file and qkd_jax/run/config_schema.py.")
    except flags.Error as err:
        message = str(err)
        if spec and ("config file" in message or "get_config" in message or "Traceback" in message):
            message = _config_file_error(spec, message)
        else:
            message = message.splitlines()[0] if message else type(err).__name__
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.exit(1)


def flags_parser(doc: str, module: str) -> Callable[[list[str]], list[str]]:
    """`parse_flags` for one command, as absl's `app.run(..., flags_parser=...)` takes it."""
    return lambda argv: parse_flags(argv, doc, module)
