"""How a message is checked against the schema of its kind (the schemas: `modelhost.protocol`).

A schema maps each field a receiver reads to a `Field`: required or not, a
predicate that accepts its value, the words that describe an acceptable value
(they go into the error), the error class to raise (BadMessage unless the
field says otherwise), and for an optional field the value its absence
stands for, which `check` fills in: a receiver reads every field it knows. The predicates here refuse what a hostile or buggy
peer may send: NaN and infinities, ids that are not hashable or not equal to
themselves, strings and lists without bound, maps nested deeper than a
dashboard can show. `check` raises the typed error, never another exception,
so no input can kill a receiver's loop.

This module runs on Python 3.7 with the standard library only.
"""

import math
import reprlib

from .errors import BadMessage

MAX_ID_CHARS = 256
MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 64 * 1024
MAX_LIST = 100000  # ids in one ping, methods or calls in one register
MAX_PLAIN_DEPTH = 8  # nesting of the free-form maps that reach `ps` and the dashboard


def is_int(value, low=None):
    return isinstance(value, int) and not isinstance(value, bool) and (
        low is None or value >= low)


def is_number(value, low=None, high=None):
    """A finite int or float within [low, high]: NaN and infinities never pass."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def is_text(value, limit=MAX_TEXT_CHARS):
    return isinstance(value, str) and len(value) <= limit


def is_request_id(value):
    """An id usable as a key: an int (never a float: NaN != NaN) or a bounded string."""
    return is_int(value) or is_text(value, MAX_ID_CHARS)


def is_name(value):
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS


def is_identity(value):
    return isinstance(value, bytes) and 0 < len(value) <= 255  # ZeroMQ's limit


def list_of(accepts, limit=MAX_LIST):
    return lambda value: isinstance(value, list) and len(value) <= limit and all(
        accepts(item) for item in value)


def or_none(accepts):
    return lambda value: value is None or accepts(value)


def one_of(choices):
    return lambda value: isinstance(value, str) and value in choices


def is_plain(value, depth=0):
    """JSON-safe: str-keyed maps, lists, strings, finite numbers, bools and null."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, (int, float)):
        return is_number(value)
    if depth >= MAX_PLAIN_DEPTH:
        return False
    if isinstance(value, list):
        return len(value) <= MAX_LIST and all(is_plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain(item, depth + 1)
                   for key, item in value.items())
    return False


NO_DEFAULT = object()  # an optional field that stays absent when it is not sent


class Field(object):
    __slots__ = ("required", "accepts", "description", "error", "default")

    def __init__(self, required, accepts, description, error=BadMessage, default=NO_DEFAULT):
        self.required = required
        self.accepts = accepts
        self.description = description
        self.error = error
        self.default = default


def required(accepts, description, error=BadMessage):
    return Field(True, accepts, description, error)


def optional(accepts, description, error=BadMessage, default=NO_DEFAULT):
    return Field(False, accepts, description, error, default)


# Bounded in depth and length: a hostile value may nest a thousand levels deep.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40


def shown(value):
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(header, schemas, selector):
    """Raise BadMessage (or the field's error) unless `header` fits the schema its
    `selector` field (op or kind) names; fill in the defaults of absent fields.
    The error's details carry the id when it is usable, so the reply can name
    the request."""
    name = header.get(selector)
    schema = schemas.get(name) if isinstance(name, str) else None
    if schema is None:
        raise BadMessage("unknown {} {}; expected one of {}".format(
            selector, shown(name), ", ".join(sorted(schemas))), _details(header))
    for field, spec in schema.items():
        if field not in header:
            if spec.required:
                raise spec.error("a {} message needs `{}`: {}".format(
                    name, field, spec.description), _details(header))
            if spec.default is not NO_DEFAULT:
                # A map or list of its own: a receiver may keep what it reads.
                default = spec.default
                header[field] = type(default)(default) if isinstance(
                    default, (dict, list)) else default
        elif not spec.accepts(header[field]):
            raise spec.error("`{}` of a {} message must be {}, not {}".format(
                field, name, spec.description, shown(header[field])), _details(header))
    return header


def _details(header):
    # Built only for an error: check runs on every message, most of them fine.
    request_id = header.get("id")
    return {"id": request_id if is_request_id(request_id) else None}
