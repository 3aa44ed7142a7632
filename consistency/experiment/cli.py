"""The commands' edge: flags parsed and the project's own errors reported in one line each."""

import os
import pathlib
import shlex
import sys
from collections.abc import Callable

from absl import app, flags

from consistency.experiment import spec
from consistency.io import checkpoints

TRACEBACK_ENV = "CONSISTENCY_TRACEBACK"  # =1: full tracebacks, also of the project's own errors
_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Errors that are always about the inputs (config, files, checkpoints), never a bug of ours.
OWN_ERRORS = (
    spec.ConfigError,
    checkpoints.ModelMismatchError,
    checkpoints.CorruptCheckpointError,
    checkpoints.NonFiniteStateError,
)
# Raised by the project's own code (the innermost frame is ours), these name a key or a file.
OWN_IF_RAISED_HERE = (ValueError, OSError)


def _raised_here(exc: BaseException) -> bool:
    tb, filename = exc.__traceback__, ""
    while tb is not None:
        filename, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    path = pathlib.Path(filename).resolve()
    return path.is_relative_to(_ROOT / "consistency") or path.parent == _ROOT


def is_own_error(exc: BaseException) -> bool:
    """An error of the inputs (reported in one line) rather than a bug (shown with a traceback).

    The project's exception types; ValueError and OSError raised by the project's code; and
    OSErrors of the operating system on a named path (permission denied, not a directory).
    """
    if isinstance(exc, OWN_ERRORS):
        return True
    if isinstance(exc, OSError) and exc.filename:
        return True
    return isinstance(exc, OWN_IF_RAISED_HERE) and _raised_here(exc)


def message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def fail(text: str) -> None:
    """Print `error: text` to stderr and exit with status 1 (no traceback)."""
    hint = f"(set {TRACEBACK_ENV}=1 for the traceback)"
    print(f"error: {text}\n{hint}", file=sys.stderr, flush=True)
    sys.exit(1)


def _tracebacks() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _override_paths(argv, name: str = "config") -> list[str]:
    """The dotted keys of the --config.KEY=VALUE overrides in argv."""
    out = []
    for arg in argv[1:]:
        if arg.startswith(f"--{name}."):
            out.append(arg[len(name) + 3 :].split("=", 1)[0])
    return out


def _unknown_key(argv, exc: BaseException) -> str:
    """The override's key prefix that the config lacks, from ml_collections' KeyError."""
    missing = str(exc.args[0] if exc.args else exc).split("\n")[0].strip("'\"")
    for path in _override_paths(argv):
        parts = path.split(".")
        if missing in parts:
            return ".".join(parts[: parts.index(missing) + 1])
    return missing


def _flag_error(e: Exception) -> str:
    """absl's message, with a traceback it embeds (a failing get_config) cut to its last line."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


def _loaded(name: str = "config") -> None:
    """Touch the config flag's value: ml_collections defers a missing file's error to first use."""
    if name in flags.FLAGS and flags.FLAGS[name].value is not None:
        flags.FLAGS[name].value.get("data")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.run's flags_parser) with one-line errors: a bad flag, an unknown
    config key (ml_collections raises KeyError/AttributeError), an unreadable config file."""
    try:
        rest = flags.FLAGS(argv)
        _loaded()
        return rest
    except Exception as e:
        if _tracebacks():
            raise
        if isinstance(e, flags.Error):
            fail(f"{_flag_error(e)}; see --helpshort")
        if isinstance(e, KeyError | AttributeError):
            key = _unknown_key(argv, e)
            lines = str(e.args[0] if e.args else e).splitlines()
            hint = f" ({lines[1].strip().lower().rstrip('?')}?)" if len(lines) > 1 else ""
            fail(f"unknown config key {key}{hint}; see configs/base.py for the keys")
        if isinstance(e, OSError):
            path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
            where = "no such file" if "No such file" in str(e) else "cannot load it"
            fail(f"--config={path}: {where}; give configs/NAME.py (or configs/NAME.py:ARG)")
        raise


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """main, with the project's own errors (see is_own_error) printed in one line and exit 1."""

    def run(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as e:
            if _tracebacks() or not is_own_error(e):
                raise
            fail(message(e))

    return run


def run(main: Callable[[list[str]], None]) -> None:
    """app.run(main) with parse_flags and guarded: the commands' entry point."""
    app.run(guarded(main), flags_parser=parse_flags)


def override_flags(overrides: dict) -> str:
    """--config.KEY=VALUE arguments (shell-quoted) that repeat ml_collections overrides."""
    return " ".join(shlex.quote(f"--config.{k}={v}") for k, v in overrides.items())
