"""JSON schemas for the structured-output tests: nested objects, arrays, enums, bounded numbers,
optional fields and string patterns. Strings and arrays are bounded so a small model finishes
within the token limit."""

from __future__ import annotations


def obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False}


NAME = {"type": "string", "maxLength": 16}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SCORE = {"type": "number", "minimum": 0, "maximum": 10}
COLOR = {"enum": ["red", "green", "blue"]}
TAGS = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1,
        "maxItems": 3}

SCHEMAS: list[dict] = [
    obj({"name": NAME}),
    obj({"name": NAME, "age": AGE}),
    obj({"age": AGE, "score": SCORE}),
    obj({"color": COLOR}),
    obj({"ok": {"type": "boolean"}}),
    obj({"tags": TAGS}),
    obj({"values": {"type": "array", "items": AGE, "minItems": 2, "maxItems": 4}}),
    obj({"person": obj({"name": NAME, "age": AGE})}),
    obj({"a": obj({"b": obj({"c": {"type": "integer", "minimum": 1, "maximum": 9}})})}),
    obj({"name": NAME, "nickname": NAME}, required=["name"]),
    obj({"id": {"type": "integer", "minimum": 1000, "maximum": 9999}, "note": NAME},
        required=["id"]),
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    obj({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
    obj({"level": {"enum": ["low", "medium", "high"]}, "count": AGE}),
    obj({"items": {"type": "array", "items": obj({"name": NAME, "qty": AGE}), "minItems": 1,
                   "maxItems": 2}}),
    obj({"point": obj({"x": SCORE, "y": SCORE})}),
    obj({"flag": {"type": "boolean"}, "color": COLOR, "size": {"enum": [1, 2, 3]}}),
    obj({"title": {"type": "string", "minLength": 3, "maxLength": 12}}),
    obj({"matrix": {"type": "array", "maxItems": 2, "minItems": 1,
                    "items": {"type": "array", "items": AGE, "minItems": 1, "maxItems": 2}}}),
    obj({"status": {"const": "done"}, "took": AGE}),
    obj({"answer": {"type": "string", "enum": ["yes", "no", "maybe"]}}),
    obj({"temperature": {"type": "number", "minimum": -50, "maximum": 50}}),
    obj({"user": obj({"name": NAME, "roles": {"type": "array", "items": COLOR, "minItems": 1,
                                               "maxItems": 2}}, required=["name"])}),
    {"type": "array", "items": AGE, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": obj({"k": NAME}), "minItems": 1, "maxItems": 2},
    {"enum": ["alpha", "beta", "gamma"]},
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "string", "maxLength": 12},
    {"anyOf": [obj({"cat": NAME}), obj({"dog": AGE})]},
    obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
         "amount": {"type": "integer", "minimum": 0, "maximum": 1000}}),
    obj({"coords": {"type": "array", "items": SCORE, "minItems": 2, "maxItems": 2}}),
]
