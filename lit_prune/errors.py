"""The errors lit_prune raises for bad input, and how the command line reports them.

Every error about what a user gave (a configuration value, an edit record, a model name, a checkpoint, a cache file)
is a :class:`LitPruneError`, a ``ValueError``: callers that catch ``ValueError`` for bad arguments catch them all.
The message names the offending file, record, field or parameter and, where there is one, says how to fix it.

:func:`describe` turns any exception into the one line ``train.py`` prints (``error: ...``); the traceback is shown
only with ``LIT_PRUNE_DEBUG=1`` (:func:`debug_enabled`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

DEBUG_ENV = "LIT_PRUNE_DEBUG"


class LitPruneError(ValueError):
    """Bad input: the message names what is wrong and where (file, record, field or parameter)."""


class ConfigError(LitPruneError):
    """A configuration value (command line, config file or constructor argument) that cannot work."""


class CheckpointError(LitPruneError):
    """A checkpoint that is missing, unreadable or written for another model."""


class CacheError(LitPruneError):
    """A cache file (converted model, statistics) that is unreadable; the message names the file to delete."""


def check_positive_ints(owner: str, values: dict[str, Any], optional: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` "<owner>: <name> must be a positive int[ or None], got <value>" for the first entry of
    ``values`` that is not an int >= 1 (bools refused; None accepted for the names in ``optional``)."""
    for name, v in values.items():
        if v is None and name in optional:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            none = " or None" if name in optional else ""
            raise ValueError(f"{owner}: {name} must be a positive int{none}, got {v!r}")


def debug_enabled() -> bool:
    """Whether ``LIT_PRUNE_DEBUG`` asks for full tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


# Exception types whose message is written for the user (bad input); anything else is reported as unexpected.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, KeyError)


def root_cause(exc: BaseException) -> BaseException:
    """The error to report for ``exc``: a lit_prune error it was raised from, or the original error under a
    wrapper that only repeats the given value (jsonargparse wraps a constructor's ``ValueError`` when it tries each
    type of an ``Optional[...]`` argument)."""
    seen = {id(exc)}
    cur = exc
    while cur.__cause__ is not None and id(cur.__cause__) not in seen:
        cause = cur.__cause__
        wrapper = "Given value" in str(cur) or "Does not validate against any of the Union subtypes" in str(cur)
        if not (isinstance(cause, LitPruneError) or wrapper):
            break
        cur = cause
        seen.add(id(cur))
    return cur


def describe(exc: BaseException) -> str:
    """The ``error: ...`` text for ``exc``: its message for bad-input errors, the type and message otherwise."""
    exc = root_cause(exc)
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    msg = msg.strip() or type(exc).__name__
    if isinstance(exc, (ValueError, TypeError)) or type(exc).__name__ == "MisconfigurationException":
        return f"error: {msg}"
    if isinstance(exc, USER_ERRORS):
        return f"error: {msg} ({type(exc).__name__})"
    return (f"error: unexpected {type(exc).__module__}.{type(exc).__name__}: {msg}\n"
            f"       this may be a bug in lit_prune; run again with {DEBUG_ENV}=1 to see the traceback")


def fail(exc: BaseException) -> NoReturn:
    """End a command on ``exc``: its one-line :func:`describe` on stderr and exit status 1 (with
    ``LIT_PRUNE_DEBUG=1`` the exception is re-raised with its traceback). ``train.py`` and
    ``python -m lit_prune.mend_training`` end every failure here."""
    if debug_enabled():
        raise exc
    sys.stderr.write(describe(exc) + "\n")
    sys.stderr.flush()
    raise SystemExit(1)
