"""The ``finish_reason`` row column of a store of teacher-generated responses: why each response ended.

One byte per row (docs/format.md, "Generated responses"): ``0`` stop token, ``1`` ``max_new_tokens``
reached, ``2 + i`` the response text came to hold stop string ``i`` of the store's settings.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptShardError, TargetsError

FINISH_CODES = {"stop": 0, "length": 1, "stop-string": 2}  # code 2 + i: the settings' stop string i
MAX_FINISH_CODE = 255


def finish_code(reason: str, stop_string: int | None = None) -> int:
    """The stored code of a finish reason: 0 stop, 1 length, ``2 + i`` for stop string ``i``."""
    if reason not in FINISH_CODES or (reason == "stop-string") != (stop_string is not None):
        raise TargetsError(f"finish reason {reason!r} (stop string {stop_string!r}); expected stop, length, or "
                           "stop-string with the index of the stop string that ended the response")
    return FINISH_CODES[reason] + (stop_string or 0)


def finish_column(code: int) -> bytes:
    """A generated row's ``finish_reason`` column: its code in one byte."""
    if not isinstance(code, (int, np.integer)) or not 0 <= code <= MAX_FINISH_CODE:
        raise TargetsError(f"finish code {code!r}; expected an integer in [0, {MAX_FINISH_CODE}] (finish_code)")
    return bytes([int(code)])


def row_finish(columns: dict[str, np.ndarray], stop_strings: int | None = None) -> tuple[str, int | None] | None:
    """A decoded row's ``(finish reason, stop string index or None)``; None for a row without the column.
    ``stop_strings``: how many stop strings the store's settings list; a code naming another is refused."""
    if "finish_reason" not in columns:
        return None
    data = columns["finish_reason"]
    if data.size != 1:
        raise CorruptShardError(f"finish_reason holds {data.size} bytes; 1 expected (one code per row)")
    code = int(data[0])
    if stop_strings is not None and code >= FINISH_CODES["stop-string"] + stop_strings:
        raise CorruptShardError(f"finish_reason code {code} names stop string {code - 2}; the store's settings list "
                                f"{stop_strings} (codes 0 .. {1 + stop_strings} expected)")
    return ("stop", None) if code == 0 else ("length", None) if code == 1 else ("stop-string", code - 2)


__all__ = ["FINISH_CODES", "MAX_FINISH_CODE", "finish_code", "finish_column", "row_finish"]
