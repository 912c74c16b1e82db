"""A regex parser for the patterns the device automaton runs (`grammar.byte_dfa`).

It reads the part of llguidance's (Rust `regex`) syntax whose language is plain to state over
Unicode scalar values: literals and escapes, classes (ranges, negation, `\\s`), `.`,
groups (capturing, `(?:...)`, named, the `s` flag), alternation and the repetitions `? * +
{n} {n,} {n,m}` (lazy forms match the same language). Everything else (anchors, word
boundaries, `\\d`, `\\w`, `\\p{...}`, other flags, class set operations) raises
`UnsupportedPattern`: such a pattern stays with llguidance on the host, which reads it in full.

The tree it returns: ("chars", ranges) with sorted, disjoint inclusive code-point ranges;
("cat", [nodes]); ("alt", [nodes]); ("repeat", node, min, max or None).
"""

from __future__ import annotations

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
# Rust's `\s`: the Unicode White_Space property (a fixed list).
WHITE_SPACE = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
               (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
               (0x3000, 0x3000))
SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "a": 0x07}
MAX_REPEAT = 1000


class UnsupportedPattern(ValueError):
    """A pattern outside what the device automaton reads (it runs with llguidance instead)."""


Ranges = tuple[tuple[int, int], ...]


def normalize(ranges) -> Ranges:
    """Sorted, merged ranges without the surrogates (which no UTF-8 text holds)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    cut = []
    for lo, hi in out:
        if lo <= SURROGATES[1] and hi >= SURROGATES[0]:
            cut += [(lo, SURROGATES[0] - 1)] if lo < SURROGATES[0] else []
            cut += [(SURROGATES[1] + 1, hi)] if hi > SURROGATES[1] else []
        else:
            cut.append((lo, hi))
    return tuple(cut)


def negate(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return normalize(out)


def class_escape(letter: str) -> Ranges | None:
    """The ranges of `\\s \\S`, or None for a letter that is not such a class. (`\\d` is
    Unicode's Nd, which grows with each Unicode version: Python's tables need not be
    llguidance's, so patterns with it stay with llguidance.)"""
    if letter.lower() != "s":
        return None
    spaces = normalize(WHITE_SPACE)
    return spaces if letter == "s" else negate(spaces)


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.s = pattern
        self.i = 0

    def fail(self, what: str) -> UnsupportedPattern:
        return UnsupportedPattern(f"{what} at offset {self.i} of {self.s!r}")

    def peek(self) -> str | None:
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self) -> str:
        c = self.peek()
        if c is None:
            raise self.fail("unexpected end")
        self.i += 1
        return c

    def parse(self) -> tuple:
        node = self.alternation(dotall=False)
        if self.i != len(self.s):
            raise self.fail("unbalanced ')'")
        return node

    def alternation(self, dotall: bool) -> tuple:
        branches = []
        while True:
            branch, dotall = self.concatenation(dotall)
            branches.append(branch)
            if self.peek() != "|":
                break
            self.i += 1
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self, dotall: bool) -> tuple[tuple, bool]:
        """Items up to `|` or `)`; a bare `(?s)` turns dotall on for the rest of the group."""
        items = []
        while self.peek() not in (None, "|", ")"):
            if self.s.startswith("(?s)", self.i):
                self.i += 4
                dotall = True
                continue
            items.append(self.repetition(self.atom(dotall)))
        return ("cat", items), dotall

    def repetition(self, node: tuple) -> tuple:
        while True:
            c = self.peek()
            if c in ("?", "*", "+"):
                self.i += 1
                lo, hi = {"?": (0, 1), "*": (0, None), "+": (1, None)}[c]
            elif c == "{":
                lo, hi = self.counts()
            else:
                return node
            if self.peek() == "?":  # lazy: the same language
                self.i += 1
            node = ("repeat", node, lo, hi)

    def counts(self) -> tuple[int, int | None]:
        end = self.s.find("}", self.i)
        if end < 0:
            raise self.fail("unclosed '{'")
        body = self.s[self.i + 1:end]
        parts = body.split(",")
        try:
            lo = int(parts[0])
            hi = lo if len(parts) == 1 else (None if parts[1] == "" else int(parts[1]))
        except ValueError:
            raise self.fail(f"repetition {{{body}}}") from None
        if len(parts) > 2 or (hi is not None and hi < lo) or max(lo, hi or 0) > MAX_REPEAT:
            raise self.fail(f"repetition {{{body}}}")
        self.i = end + 1
        return lo, hi

    def atom(self, dotall: bool) -> tuple:
        c = self.take()
        if c == "(":
            return self.group(dotall)
        if c == "[":
            return ("chars", self.char_class())
        if c == ".":
            return ("chars", normalize([(0, MAX_CODE_POINT)]) if dotall else
                    normalize([(0, 0x09), (0x0B, MAX_CODE_POINT)]))
        if c == "\\":
            return ("chars", self.escape(in_class=False))
        if c in "^$":
            raise self.fail(f"anchor {c!r}")
        if c in "*+?{":
            raise self.fail(f"repetition {c!r} without an operand")
        return ("chars", ((ord(c), ord(c)),))

    def group(self, dotall: bool) -> tuple:
        if self.s.startswith("?:", self.i):
            self.i += 2
        elif self.s.startswith("?s:", self.i):
            self.i += 3
            dotall = True
        elif self.s.startswith("?P<", self.i) or self.s.startswith("?<", self.i):
            end = self.s.find(">", self.i)
            if end < 0:
                raise self.fail("unclosed group name")
            self.i = end + 1
        elif self.peek() == "?":
            raise self.fail("group flags other than 's'")
        node = self.alternation(dotall)
        if self.peek() != ")":
            raise self.fail("unclosed '('")
        self.i += 1
        return node

    def escape(self, in_class: bool) -> Ranges:
        c = self.take()
        ranges = class_escape(c)
        if ranges is not None:
            return ranges
        if c in SIMPLE_ESCAPES:
            cp = SIMPLE_ESCAPES[c]
        elif c in "xuU":
            cp = self.hex_escape(c)
        elif c.isascii() and not c.isalnum() and c not in "<>":  # \< and \> are word boundaries
            cp = ord(c)
        else:
            raise self.fail(f"escape \\{c}")
        return ((cp, cp),)

    def hex_escape(self, kind: str) -> int:
        if self.peek() == "{":
            end = self.s.find("}", self.i)
            digits, self.i = self.s[self.i + 1:end], end + 1
        else:
            n = {"x": 2, "u": 4, "U": 8}[kind]
            digits, self.i = self.s[self.i:self.i + n], self.i + n
        try:
            cp = int(digits, 16)
        except ValueError:
            raise self.fail(f"escape \\{kind}{digits}") from None
        if cp > MAX_CODE_POINT or SURROGATES[0] <= cp <= SURROGATES[1]:
            raise self.fail(f"code point {cp:#x}")
        return cp

    def char_class(self) -> Ranges:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            if c == "[" or (c in "&~-" and self.peek() == c):
                raise self.fail("nested classes and class set operations")
            item = self.escape(in_class=True) if c == "\\" else ((ord(c), ord(c)),)
            if len(item) == 1 and item[0][0] == item[0][1] and self.peek() == "-" \
                    and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi_char = self.take()
                hi = self.escape(in_class=True) if hi_char == "\\" else ((ord(hi_char),) * 2,)
                if len(hi) != 1 or hi[0][0] != hi[0][1] or hi[0][0] < item[0][0]:
                    raise self.fail("class range")
                item = ((item[0][0], hi[0][0]),)
            ranges += item
        out = normalize(ranges)
        return negate(out) if negated else out


def parse(pattern: str) -> tuple:
    """The pattern's tree; raises UnsupportedPattern outside the syntax the module lists."""
    return _Parser(pattern).parse()


def literal(text: str) -> tuple:
    """The tree matching exactly `text`."""
    return ("cat", [("chars", ((ord(c), ord(c)),)) for c in text])


__all__ = ["UnsupportedPattern", "literal", "parse"]
