"""The one place where a command's outcome becomes an exit code.

0 done; 1 a gate failed (:class:`GateFailed`); 2 bad input or environment (:class:`DqncError`, a full
disk); 3 a bug in dqnc (any other exception); 130 interrupted (Ctrl-C or SIGTERM). ``--debug`` (or
DQNC_DEBUG=1) lets the traceback through instead.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from dqnc import progress
from dqnc.cli import render
from dqnc.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, DqncError, GateFailed

F = TypeVar("F", bound=Callable[..., Any])
debug = {"on": os.environ.get("DQNC_DEBUG", "") not in ("", "0")}
_ENV_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def guard(fn: F) -> F:
    """Map DqncError / Ctrl-C / SIGTERM / a bug to one stderr line and the documented exit code,
    give every command ``--quiet`` (one definition, here) and show the progress of the work it
    runs on stderr (:mod:`dqnc.progress`: live on a terminal, a plain line every 10 s otherwise)."""
    sig = inspect.signature(fn, eval_str=True)
    own_quiet = "quiet" in sig.parameters

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        render.ui["quiet"] = bool(kwargs.get("quiet") if own_quiet else kwargs.pop("quiet", False))
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with progress.shown(render.stderr, quiet=render.ui["quiet"]):
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):
            raise
        except BaseException as e:  # noqa: BLE001 - every outcome is mapped below, or re-raised
            raise typer.Exit(exit_code(e)) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    if not own_quiet:
        quiet = inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                                  annotation=Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")])
        wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), quiet])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def exit_code(e: BaseException) -> int:
    """Print the one line an exception deserves and return its exit code, or re-raise it (--debug,
    SystemExit). Any other OSError is a bug like the rest: exit 3."""
    if isinstance(e, GateFailed):
        render.problem("gate failed:", str(e))
        return e.exit_code
    if debug["on"] or not isinstance(e, (Exception, KeyboardInterrupt)):
        raise e
    if isinstance(e, KeyboardInterrupt):
        render.problem("interrupted:", "nothing partial was left at the output path")
        return EXIT_INTERRUPTED
    if isinstance(e, DqncError):
        render.problem("error:", str(e))
        return e.exit_code
    if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
        # The environment, not dqnc: a full disk, a read-only or forbidden path.
        where = f" {e.filename!r}" if e.filename else ""
        render.problem("error:", f"cannot write{where}: {e.strerror}; free space or choose a writable output path "
                       "(nothing partial was left behind)")
        return 2
    # Anything else is a bug in dqnc: exit 3, one line, the traceback behind --debug.
    first = (str(e).strip().splitlines() or [""])[0][:300]
    render.problem("internal error:", f"{type(e).__name__}: {first} (a bug in dqnc: re-run with --debug for the "
                   "traceback and report it)")
    return EXIT_INTERNAL


def exit_interrupted() -> None:
    """Exit 130 after an interrupt. Outputs are already cleaned up (atomic writes) and the message
    printed; with TensorFlow loaded, the interpreter's own shutdown can abort (SIGABRT, "PyThreadState_Get:
    the GIL is released") while TF's worker threads are still inside an interrupted op, so the
    process skips it."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "tensorflow" in sys.modules:
        os._exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)
