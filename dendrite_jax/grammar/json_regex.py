"""JSON schemas as regular trees (`regex_syntax` trees), in llguidance's compact JSON.

A schema whose documents form a regular language becomes the tree of exactly the texts
llguidance's JSON grammar accepts with `whitespace_flexible: false` (what `grammar.matcher`
compiles): no whitespace, separators "," and ":", properties in the schema's order (required
ones present, optional ones may be left out, nothing else), strings of any scalar value but
`"`, `\\`, U+0000-U+001F and U+007F, with the escapes `\\" \\\\ \\b \\f \\n \\r \\t`
(not `\\/`) and `\\u00XX` for control characters only, canonical integers and numbers, enums
and consts of scalars as compact JSON. These rules were read off llguidance's masks and are
checked against them (`tests/grammar/test_device_automaton.py`).

The subset: types string (minLength, maxLength, a pattern anchored at both ends whose
characters need no escaping), integer (bounds), number (no bounds), boolean, null, lists of
types; enum and const of strings, integers, booleans and null; objects with properties,
required and `additionalProperties: false`; arrays with items, minItems and maxItems; anyOf.
Anything else (recursion, `$ref`, open objects, `oneOf`, `x-guidance` options, unknown keys)
raises `UnsupportedPattern`, and the schema keeps its llguidance matcher.
"""

from __future__ import annotations

import json

from dendrite_jax.grammar import regex_syntax
from dendrite_jax.grammar.regex_syntax import UnsupportedPattern, literal, normalize

ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples",
               "deprecated", "readOnly", "writeOnly"}
TYPE_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": set(),
    "boolean": set(),
    "null": set(),
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
}
HEX = (("0", "9"), ("a", "f"), ("A", "F"))
DIGIT = ("chars", ((ord("0"), ord("9")),))
NONZERO = ("chars", ((ord("1"), ord("9")),))


def _chars(*ranges: tuple[str, str]) -> tuple:
    return ("chars", normalize((ord(a), ord(b)) for a, b in ranges))


# One character of a JSON string's text: a plain character, or an escape llguidance allows.
STRING_CHAR = ("alt", [
    ("chars", normalize([(0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E), (0x80, 0x10FFFF)])),
    ("cat", [literal("\\"), _chars(('"', '"'), ("\\", "\\"), ("b", "b"), ("f", "f"),
                                   ("n", "n"), ("r", "r"), ("t", "t"))]),
    ("cat", [literal("\\u00"), ("alt", [("cat", [_chars(("0", "1")), _chars(*HEX)]),
                                        ("cat", [literal("7"), _chars(("f", "f"), ("F", "F"))])])]),
])
PLAIN = normalize([(0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E), (0x80, 0x10FFFF)])
UNSIGNED = ("alt", [literal("0"), ("cat", [NONZERO, ("repeat", DIGIT, 0, None)])])
INTEGER = ("cat", [("repeat", literal("-"), 0, 1), UNSIGNED])
NUMBER = ("cat", [INTEGER, ("repeat", ("cat", [literal("."), ("repeat", DIGIT, 1, None)]), 0, 1),
                  ("repeat", ("cat", [_chars(("e", "e"), ("E", "E")),
                                      ("repeat", _chars(("+", "+"), ("-", "-")), 0, 1),
                                      ("repeat", DIGIT, 1, None)]), 0, 1)])


def schema_tree(schema: dict | str) -> tuple:
    """The tree of the compact JSON texts llguidance accepts for `schema`; raises
    UnsupportedPattern outside the module's subset."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise UnsupportedPattern(f"schema is not JSON: {e}") from None
    return _value(schema, depth=0)


def _value(schema, depth: int) -> tuple:
    if depth > 32:
        raise UnsupportedPattern("schema nests deeper than 32")
    if schema is True or schema == {}:
        raise UnsupportedPattern("any JSON value (not regular)")
    if not isinstance(schema, dict):
        raise UnsupportedPattern(f"schema {schema!r}")
    keys = set(schema) - ANNOTATIONS
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        _only(keys, {"enum", "const", "type"})
        return ("alt", [literal(_scalar(v)) for v in values])
    if "anyOf" in schema:
        _only(keys, {"anyOf"})
        return ("alt", [_value(s, depth + 1) for s in schema["anyOf"]])
    types = schema.get("type")
    if types is None:
        raise UnsupportedPattern("a schema without a type (any JSON value)")
    types = types if isinstance(types, list) else [types]
    allowed = {"type"}.union(*(TYPE_KEYWORDS.get(t, set()) for t in types))
    _only(keys, allowed)
    return ("alt", [_typed(t, schema, depth) for t in types])


def _typed(kind: str, schema: dict, depth: int) -> tuple:
    if kind == "string":
        return _string(schema)
    if kind == "integer":
        return _integer(schema)
    if kind == "number":
        return NUMBER
    if kind == "boolean":
        return ("alt", [literal("true"), literal("false")])
    if kind == "null":
        return literal("null")
    if kind == "object":
        return _object(schema, depth)
    if kind == "array":
        return _array(schema, depth)
    raise UnsupportedPattern(f"type {kind!r}")


def _string(schema: dict) -> tuple:
    if "pattern" in schema:
        if "minLength" in schema or "maxLength" in schema:
            raise UnsupportedPattern("a pattern with length bounds")
        pattern = schema["pattern"]
        if not (pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")):
            raise UnsupportedPattern("a string pattern not anchored at both ends")
        tree = regex_syntax.parse(pattern[1:-1])
        if not _within(tree, PLAIN):
            raise UnsupportedPattern("a string pattern with characters JSON escapes")
        return ("cat", [literal('"'), tree, literal('"')])
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if not isinstance(lo, int) or (hi is not None and (not isinstance(hi, int) or hi < lo)):
        raise UnsupportedPattern("string length bounds")
    if max(lo, hi or 0) > regex_syntax.MAX_REPEAT:
        raise UnsupportedPattern(f"string lengths over {regex_syntax.MAX_REPEAT}")
    return ("cat", [literal('"'), ("repeat", STRING_CHAR, lo, hi), literal('"')])


def _within(tree: tuple, ranges) -> bool:
    """Whether every character `tree` can match lies in `ranges`."""
    if tree[0] == "chars":
        return all(any(a <= lo and hi <= b for a, b in ranges) for lo, hi in tree[1])
    if tree[0] == "repeat":
        return _within(tree[1], ranges)
    return all(_within(child, ranges) for child in tree[1])


def _integer(schema: dict) -> tuple:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if "exclusiveMinimum" in schema:
        lo = _bound(schema["exclusiveMinimum"]) + 1
    if "exclusiveMaximum" in schema:
        hi = _bound(schema["exclusiveMaximum"]) - 1
    lo = None if lo is None else _bound(lo)
    hi = None if hi is None else _bound(hi)
    if lo is None and hi is None:
        return INTEGER
    if lo is None or (hi is not None and hi < lo):
        raise UnsupportedPattern("integer bounds")
    parts = []
    if lo < 0:
        neg_hi = -1 if hi is None or hi >= 0 else hi
        parts.append(("cat", [literal("-"), _unsigned_range(-neg_hi, -lo)]))
    if hi is None or hi >= 0:
        parts.append(_unsigned_range(max(lo, 0), hi))
    return ("alt", parts)


def _bound(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise UnsupportedPattern(f"integer bound {value!r}")
    return int(value)


def _unsigned_range(lo: int, hi: int | None) -> tuple:
    """Canonical decimals of lo..hi (hi None: unbounded)."""
    parts = []
    top = len(str(hi)) if hi is not None else len(str(lo))
    for n in range(len(str(lo)), top + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = 10 ** n - 1 if hi is None else min(hi, 10 ** n - 1)
        if a <= b:
            parts.append(_same_length(str(a), str(b)))
    if hi is None:  # every longer number
        parts.append(("cat", [NONZERO, ("repeat", DIGIT, top, None)]))
    return ("alt", parts)


def _same_length(lo: str, hi: str) -> tuple:
    """Decimals of lo..hi, both of one length."""
    if lo == hi:
        return literal(lo)
    if len(lo) == 1:
        return _chars((lo, hi))
    if lo[0] == hi[0]:
        return ("cat", [literal(lo[0]), _same_length(lo[1:], hi[1:])])
    rest = len(lo) - 1
    parts = [("cat", [literal(lo[0]), _same_length(lo[1:], "9" * rest)])]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(("cat", [_chars((str(int(lo[0]) + 1), str(int(hi[0]) - 1))),
                              ("repeat", DIGIT, rest, rest)]))
    parts.append(("cat", [literal(hi[0]), _same_length("0" * rest, hi[1:])]))
    return ("alt", parts)


def _object(schema: dict, depth: int) -> tuple:
    if schema.get("additionalProperties", True) is not False:
        raise UnsupportedPattern("an object open to other properties (set additionalProperties "
                                 "to false)")
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    if not required <= set(properties):
        raise UnsupportedPattern("a required property without a schema")
    members = [(literal(json.dumps(name, ensure_ascii=False) + ":"), _value(s, depth + 1),
                name in required) for name, s in properties.items()]

    def after_first(i: int) -> tuple:  # members i.. once one is written: each led by ","
        out = []
        for key, value, needed in members[i:]:
            item = ("cat", [literal(","), key, value])
            out.append(item if needed else ("repeat", item, 0, 1))
        return ("cat", out)

    def from_start(i: int) -> tuple:  # members i.., none written yet
        if i == len(members):
            return ("cat", [])
        key, value, needed = members[i]
        first = ("cat", [key, value, after_first(i + 1)])
        return first if needed else ("alt", [first, from_start(i + 1)])

    return ("cat", [literal("{"), from_start(0), literal("}")])


def _array(schema: dict, depth: int) -> tuple:
    if "items" not in schema or isinstance(schema["items"], list):
        raise UnsupportedPattern("an array without one items schema")
    item = _value(schema["items"], depth + 1)
    lo, hi = schema.get("minItems", 0), schema.get("maxItems")
    if (hi is not None and hi < lo) or max(lo, hi or 0) > regex_syntax.MAX_REPEAT:
        raise UnsupportedPattern("array length bounds")
    more = ("repeat", ("cat", [literal(","), item]), max(lo - 1, 0),
            None if hi is None else hi - 1)
    items = ("cat", [item, more])
    if hi == 0:
        items = ("cat", [])
    elif lo == 0:
        items = ("repeat", items, 0, 1)
    return ("cat", [literal("["), items, literal("]")])


def _scalar(value) -> str:
    if value is None or isinstance(value, bool | int | str):
        return json.dumps(value, ensure_ascii=False)
    raise UnsupportedPattern(f"enum value {value!r} (only strings, integers, booleans, null)")


def _only(keys: set[str], allowed: set[str]) -> None:
    extra = keys - allowed
    if extra:
        raise UnsupportedPattern(f"schema keywords {sorted(extra)}")


__all__ = ["schema_tree"]
