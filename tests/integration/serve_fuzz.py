"""A small schema-driven request fuzzer (schemathesis is not installed): bodies generated from an
OpenAPI request schema, valid ones and mutated ones (wrong types, out-of-range and non-finite
numbers, missing and unknown fields, huge strings, broken JSON), all seeded and reproducible."""
from __future__ import annotations

import json
import random
import string

NASTY_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-400", "9" * 40, "-0", "0.5e1"]
NASTY_VALUES = [None, True, False, 0, -1, 2**63, -(2**63) - 1, 1.5, "", " ", "\u0000", "é", "\ud7ff",
                [], {}, [None], {"a": 1}, "x" * 3000]


def resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        schema = root.get("components", {}).get("schemas", {}).get(name) or root.get("$defs", {})[name]
    return schema


def value_for(schema: dict, root: dict, rng: random.Random):
    """A value that satisfies `schema` most of the time (bounds are respected when given)."""
    schema = resolve(schema, root)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return value_for(rng.choice(schema[key]), root, rng)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind == "string":
        lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 40), 40)
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(lo, max(lo, hi))))
    if kind == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -5) + 1 if "exclusiveMinimum" in schema else -5)
        hi = schema.get("maximum", lo + 100)
        return rng.randint(int(lo), int(min(hi, lo + 100)))
    if kind == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -2.0))
        hi = schema.get("maximum", lo + 4.0)
        return rng.uniform(lo, hi)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "array":
        n = rng.randint(0, min(schema.get("maxItems", 5), 5))
        return [value_for(schema.get("items", {}), root, rng) for _ in range(n)]
    if kind == "object":
        return {k: value_for(v, root, rng) for k, v in schema.get("properties", {}).items()
                if k in schema.get("required", []) or rng.random() < 0.5}
    return rng.choice(NASTY_VALUES)


def bodies(schema: dict, root: dict, n: int, seed: int = 0):
    """n raw request bodies (bytes) for an object schema: about a third valid, the rest mutated."""
    rng = random.Random(seed)
    schema = resolve(schema, root)
    fields = list(schema.get("properties", {}))
    for i in range(n):
        body = value_for(schema, root, rng)
        mutation = rng.randrange(8) if i % 3 else -1
        if mutation == 0 and fields:      # a field of the wrong kind
            body[rng.choice(fields)] = rng.choice(NASTY_VALUES)
        elif mutation == 1 and fields:    # a non-finite or absurd number, as raw JSON text
            key = rng.choice(fields)
            body[key] = 0
            raw = json.dumps(body).replace(f'"{key}": 0', f'"{key}": {rng.choice(NASTY_NUMBERS)}')
            yield raw.encode()
            continue
        elif mutation == 2 and body:      # a required field missing
            body.pop(rng.choice(list(body)))
        elif mutation == 3:               # an unknown field
            body["".join(rng.choice(string.ascii_lowercase) for _ in range(6))] = 1
        elif mutation == 4:               # broken JSON
            raw = json.dumps(body)
            yield raw[: rng.randrange(len(raw))].encode()
            continue
        elif mutation == 5:               # not an object
            body = rng.choice([[body], "text", 3, None, [1, 2]])
        elif mutation == 6:               # random bytes
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            continue
        elif mutation == 7 and fields:    # nested junk in every field
            body = {k: rng.choice(NASTY_VALUES) for k in fields}
        yield json.dumps(body).encode()
