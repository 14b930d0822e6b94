"""The checkpoint filter (``--regex``), compiled with RE2: matching takes linear time, so no pattern can hang a scan.

Python's ``re`` backtracks: ``(a+)+$`` against a long path runs for longer than the universe has
left, which once hung ``watch add`` and spun a watch worker at 100%. RE2 refuses the constructs
that need backtracking (backreferences, lookaround); the error names the construct and the fix.
"""

from __future__ import annotations

from typing import Protocol

import re2

from .errors import WatchError


class Filter(Protocol):
    pattern: str

    def search(self, text: str) -> object | None: ...


def compile_filter(regex: str) -> Filter:
    options = re2.Options()
    options.log_errors = False  # the error is raised, with its reason, instead of logged on stderr
    try:
        return re2.compile(regex, options)  # type: ignore[no-any-return]
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise WatchError(
            f"regex {regex!r} cannot be used: {reason}",
            "filters use RE2 (linear time): no backreferences (\\1) or lookaround ((?=, (?<=); quote the regex for "
            "the shell and escape dots, e.g. '\\.pt$'",
        ) from None
