"""Checks of values crossing the public API: integers that are not bools, finite real numbers,
and text that is valid Unicode. Errors are ValueErrors naming the parameter."""

from __future__ import annotations

import math
import numbers

import numpy as np


def is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_finite_real(value: object) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
            and math.isfinite(value))


def check_text(text: object, param: str) -> str:
    """`text` if it is a str of valid Unicode (no lone surrogates), else ValueError naming
    `param`."""
    if not isinstance(text, str):
        raise ValueError(f"{param} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{param} is not valid Unicode text ({e.reason} at index "
                         f"{e.start})") from None
    return text
