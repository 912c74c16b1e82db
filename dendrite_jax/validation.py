"""Checks of values crossing the public API: integers that are not bools, finite real numbers,
and text that is valid Unicode. A bad value raises `ParamError`, a ValueError that carries the
parameter's name, so front ends (the HTTP server's `param`) need not read it from the message."""

from __future__ import annotations

import math
import numbers

import numpy as np


class ParamError(ValueError):
    """A bad value for the parameter `param` (e.g. "temperature", "stop[1]", "prompt")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_finite_real(value: object) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
            and math.isfinite(value))


def is_unicode(text: str) -> bool:
    """Whether `text` is valid Unicode (it holds no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(text: object, param: str) -> str:
    """`text` if it is a str of valid Unicode, else ParamError naming `param`."""
    if not isinstance(text, str):
        raise ParamError(param, f"{param} must be a string, got {type(text).__name__}")
    if not is_unicode(text):
        raise ParamError(param, f"{param} is not valid Unicode text (it holds a lone "
                         "surrogate)")
    return text
