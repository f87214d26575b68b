"""Parsing the command lines' flags (`app.run(main, flags_parser=parse_flags)`) so that a bad flag or a bad
`--config` file stops with one line, `error: ...`, and exit status 2.

absl prints a flag error after "FATAL Flags parsing error", with the traceback of a config file's own
exception inside it; ml_collections defers a missing config file to the first use of the config, deep in
the run; a syntax error in the config file escapes as a traceback. Each becomes one line here, naming the
config file and line where the error is in it. An `--config.KEY=...` override of a key the config lacks is
left to the caller (`sft_jax.main`), which names the argument.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

from absl import flags

EXIT_FAILURE, EXIT_USAGE = 1, 2
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort")


def fail(message: object, status: int = EXIT_FAILURE) -> NoReturn:
    """Ends a command with `error: MESSAGE` on one line (whitespace collapsed) and exit `status`."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def _fail(message: str) -> NoReturn:
    fail(message, EXIT_USAGE)


def run_command(main) -> None:
    """Runs a command's absl `main`: JAX's CPU set-up first (before anything starts its backend), then flag
    parsing with every error one line (`parse_flags`)."""
    from absl import app

    from sft_jax import platform

    platform.configure_cpu()
    app.run(main, flags_parser=parse_flags)


def _config_arg(argv: list[str]) -> str | None:
    """The value of --config (path[:arg]) as given on the command line, or None."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _innermost_user_frame(e: BaseException) -> str | None:
    """"file:line" of the innermost frame of `e`'s traceback outside Python, its packages and this module:
    the line of the config file (or of what it imports) that raised."""
    library = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        path = os.path.realpath(frame.filename)
        if not path.startswith(library) and path != os.path.realpath(__file__) and frame.filename[:1] != "<":
            return f"{frame.filename}:{frame.lineno}"
    return None


def _root(e: BaseException) -> BaseException:
    """The exception that started a chain of re-raises (absl and ml_collections each wrap the config's)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _config_file_error(e: BaseException, config: str | None) -> str | None:
    """One line for an exception raised while the --config file was loaded, or None when `e` is not that."""
    path = (config or "").split(":", 1)[0]
    if isinstance(e, SyntaxError):
        return f"{e.filename}:{e.lineno}: {e.msg} (--config={config})"
    if isinstance(e, AttributeError) and "has no attribute 'get_config'" in str(e):
        return f"--config={config}: {path} defines no get_config()"
    root = _root(e)
    where = _innermost_user_frame(root)
    if where is None:
        return None
    reason = (str(root).strip().splitlines() or [""])[0]
    return f"{where}: {type(root).__name__}: {reason} (raised while loading --config={config})"


def _check_config_value(config: str | None) -> None:
    """ml_collections keeps a config file it could not load (missing, a directory) as an object that raises
    at its first use; and `get_config()` may return something other than a ConfigDict. Both stop here."""
    if "config" not in flags.FLAGS:
        return
    value = flags.FLAGS["config"].value
    try:
        ok = value is None or callable(getattr(value, "to_dict", None))
    except OSError as e:  # the deferred load error: its last line is the reason ("[Errno 2] No such file ...")
        reason = str(_root(e)).strip().splitlines()[-1].strip()
        if "No such file" in reason:
            reason = "no such config file"
        _fail(f"--config={config}: {reason}")
    if not ok:
        _fail(f"--config={config}: get_config() returned {type(value).__name__}, expected a ConfigDict")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`flags_parser` of `app.run`) with every error one line and exit status 2."""
    config = _config_arg(argv)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:  # a bad value; a config file's TypeError / ValueError arrives wrapped in one
        root = _root(e)
        message = None if root is e else _config_file_error(root, config)
        _fail(message or str(e))
    except Exception as e:  # noqa: BLE001 (whatever the config file's code raised while it was loaded)
        message = _config_file_error(e, config)
        if message is None:  # not from the config file's code: e.g. --config.KEY=... naming no key, which
            raise  # the caller names
        _fail(message)
    _check_config_value(config)
    return rest


def help_requested(argv: list[str]) -> bool:
    """Whether the command line asks for --help (before a "--" that ends the flags)."""
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    return any(a in HELP_FLAGS for a in args)


def help_text(doc: str, flag_names: tuple[str, ...], *extra: str) -> str:
    """The usage `doc`, the command's own flags with their help, then `extra` sections."""
    flag_lines = [f"  --{name}: {flags.FLAGS[name].help}" for name in flag_names]
    return "\n\n".join([doc.strip(), "\n".join(["Flags:", *flag_lines]), *extra])
