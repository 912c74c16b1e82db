"""ApiError: an HTTP error answered with OpenAI's error body, its message one line."""

from __future__ import annotations

MAX_MESSAGE_CHARS = 300


def one_line(message: str) -> str:
    """`message` as one short line: a parser's multi-line dump keeps its first line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    line = lines[0] if lines else "unknown error"
    if len(lines) > 1 and line.endswith(":"):  # "Parser error:\n<the reason>"
        line = f"{line} {lines[1]}"
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS - 3] + "..."


class ApiError(Exception):
    """An HTTP error answered with OpenAI's error body; `param` names the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        message = one_line(message)
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (status, message, param,
                                                                       kind, code)
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}
