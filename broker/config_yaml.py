"""YAML as a node tree that keeps every value's line, and the checks every section uses.

The file is composed into a YAML node tree rather than loaded into plain
objects, so that every key and value keeps the line it came from: an error
names the file, the line and the dotted key path, e.g.

    config.yaml:12: daemons.espeak.concurrency: expected a positive integer, got 'two'

`NodeReader` collects every problem and raises one ConfigError listing them
all, so a user fixes a file in one pass instead of one error per restart. Its
converters return the value, or `_BAD` after recording an error. The sections
themselves are read in config_sections.py and config_gateway.py.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .config_model import ConfigError, default_of, parse_size

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_REF = re.compile(r"\$(?:\{([^}]*)\}|(\w+))")

_BAD = object()  # a value that failed validation; the error is already recorded
_FROM_SECTION = object()  # a default not given: the section dataclass's
_FLOAT = "tag:yaml.org,2002:float"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"


class NodeReader:
    """Reads one file's nodes; the section readers (and the file's parser) extend it."""

    def __init__(self, path: Path | None):
        self.path = path
        self.label = str(path) if path is not None else "<string>"
        # Relative paths in the file mean "next to the file", as in most tools' configs.
        self.base = Path(os.path.abspath(path.parent)) if path is not None else Path.cwd()
        self.errors: list[tuple[int, str]] = []
        # One constructor per parse: it caches constructed objects per node.
        self.constructor = yaml.constructor.SafeConstructor()

    # -- reporting

    def error(self, where: Node | int, key: str, message: str) -> None:
        line = where if isinstance(where, int) else where.start_mark.line + 1
        prefix = f"{self.label}:{line}: "
        self.errors.append((line, prefix + (f"{key}: " if key else "") + message))

    def _raise(self) -> None:
        if self.errors:
            # Stable sort: file order, and for one line the order of discovery.
            raise ConfigError([msg for _, msg in sorted(self.errors, key=lambda e: e[0])])

    def _syntax_error(self, e: yaml.MarkedYAMLError) -> str:
        mark = e.problem_mark or e.context_mark
        where = f"{self.label}:{mark.line + 1}" if mark else self.label
        message = f"{where}: YAML syntax error: {e.problem or e.context}"
        if e.problem and e.context and e.context_mark is not None:
            message += f" ({e.context} at line {e.context_mark.line + 1})"
        return message

    def compose(self, text: str) -> Node | None:
        """The file's node tree (None when it is empty); ConfigError on a syntax error."""
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            raise ConfigError(self._syntax_error(e)) from None
        except yaml.reader.ReaderError as e:
            # Bad characters: the error carries a character position, not a line.
            line = text.count("\n", 0, e.position) + 1
            char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
            raise ConfigError(f"{self.label}:{line}: YAML syntax error: character {char} "
                              f"is not allowed ({e.reason})") from None

    # -- fields

    def field(self, fields: dict[str, tuple[Node, Node]], kp: str, key: str,
              convert: Callable, default: Any, **kw) -> Any:
        """The converted value of an optional key: its default when absent or invalid."""
        if key not in fields:
            return default
        value = convert(fields[key][1], f"{kp}.{key}", **kw)
        return default if value is _BAD else value

    def getter(self, fields: dict[str, tuple[Node, Node]], kp: str, section: type) -> Callable:
        """`field` for one section: `get(key, convert)` defaults to what the dataclass
        `section` declares for the field (`attr=`, where its name is not the key's);
        a default given to `get` is for what the dataclass has none for."""

        def get(key: str, convert: Callable, default: Any = _FROM_SECTION, *,
                attr: str | None = None, **kw) -> Any:
            if default is _FROM_SECTION:
                default = default_of(section, attr or key)
            return self.field(fields, kp, key, convert, default, **kw)

        return get

    # -- structure

    def mapping(self, node: Node, kp: str, allowed: tuple[str, ...] | None
                ) -> dict[str, tuple[Node, Node]] | None:
        """{key: (key node, value node)} of a mapping node, checking its keys.

        `allowed` None accepts any string key (daemon names, options).
        """
        if not isinstance(node, MappingNode):
            self.error(node, kp, f"expected a mapping, got {self.describe(node)}")
            return None
        # PyYAML keeps duplicate keys silently (the last one wins); here they are
        # an error, except those that come in through a `<<` merge, which are
        # meant to be overridden.
        seen: dict[str, Node] = {}
        for knode, _ in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                continue
            key = knode.value if isinstance(knode, ScalarNode) else None
            if key in seen:
                self.error(knode, _join(kp, str(key)),
                           f"duplicate key (first at line {seen[key].start_mark.line + 1})")
            elif key is not None:
                seen[key] = knode
        try:
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as e:
            self.error(e.problem_mark.line + 1 if e.problem_mark else node, kp,
                       f"bad merge: {e.problem}")
            return None

        out: dict[str, tuple[Node, Node]] = {}
        for knode, vnode in node.value:
            key = self.scalar(knode)
            if not isinstance(key, str):
                hint = "; quote it" if isinstance(knode, ScalarNode) else ""
                self.error(knode, kp, f"keys must be strings, got {self.describe(knode)}{hint}")
                continue
            if allowed is not None and key not in allowed:
                self.error(knode, _join(kp, key), "unknown key" + (
                    _suggest(key, allowed) or f" (expected one of: {', '.join(allowed)})"))
                continue
            out[key] = (knode, vnode)
        return out

    def scalar(self, node: Node) -> Any:
        """The Python value of a scalar node; _BAD for collections or unknown tags.

        Callers report _BAD as "expected X, got <describe(node)>".
        """
        if not isinstance(node, ScalarNode):
            return _BAD
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError:
            # Tags like `!foo` compose fine but have no safe constructor.
            return _BAD

    def describe(self, node: Node) -> str:
        standard = node.tag in (_SEQ, _MAP) if not isinstance(node, ScalarNode) \
            else node.tag.startswith("tag:yaml.org,2002:")
        if not standard:  # !!set, !!omap, !custom ...
            return "a value tagged " + node.tag.replace("tag:yaml.org,2002:", "!!")
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        if node.tag == "tag:yaml.org,2002:null":
            return "nothing (null)"
        if node.tag == "tag:yaml.org,2002:str":
            return repr(node.value)
        return node.value  # numbers and booleans as written

    # -- value converters: each returns the value, or _BAD after recording an error

    def string(self, node: Node, kp: str) -> Any:
        value = self.scalar(node)
        if not isinstance(value, str):
            self.error(node, kp, f"expected a string, got {self.describe(node)}")
            return _BAD
        return value

    def integer(self, node: Node, kp: str, minimum: int) -> Any:
        value = self.scalar(node)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.error(node, kp, f"expected {what}, got {self.describe(node)}")
            return _BAD
        return value

    def duration(self, node: Node, kp: str, allow_zero: bool = False,
                 allow_null: bool = False) -> Any:
        value = self.scalar(node)
        if value is None and allow_null:
            return None
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)):
            what = "a number of seconds >= 0" if allow_zero else "a positive number of seconds"
            self.error(node, kp, f"expected {what}, got {self.describe(node)}")
            return _BAD
        return float(value)

    def choice(self, node: Node, kp: str, choices: tuple[str, ...]) -> Any:
        value = self.scalar(node)
        if not isinstance(value, str) or value not in choices:
            suggestion = _suggest(value, choices) if isinstance(value, str) else ""
            self.error(node, kp, f"expected one of {', '.join(choices)}, "
                                 f"got {self.describe(node)}{suggestion}")
            return _BAD
        return value

    def boolean(self, node: Node, kp: str) -> Any:
        value = self.scalar(node)
        if not isinstance(value, bool):
            self.error(node, kp, f"expected true or false, got {self.describe(node)}")
            return _BAD
        return value

    def size(self, node: Node, kp: str, allow_zero: bool = False) -> Any:
        value = self.scalar(node)
        try:
            if isinstance(value, float):
                raise ValueError
            size = parse_size(value)
        except ValueError:
            self.error(node, kp, "expected a size in bytes, like 1048576, \"256MiB\" or "
                                 f"\"1.5 GB\", got {self.describe(node)}")
            return _BAD
        if size < 0 or (size == 0 and not allow_zero):
            what = "a size >= 0" if allow_zero else "a positive size"
            self.error(node, kp, f"expected {what}, got {self.describe(node)}")
            return _BAD
        return size

    def path_value(self, node: Node, kp: str, what: str = "a path") -> Any:
        value = self.scalar(node)
        if not isinstance(value, str) or not value:
            self.error(node, kp, f"expected {what}, got {self.describe(node)}")
            return _BAD
        expanded = self.expand(value, node, kp)
        return _BAD if expanded is _BAD else self.resolve(expanded)

    def path_list(self, node: Node, kp: str) -> Any:
        if not isinstance(node, SequenceNode):
            self.error(node, kp, f"expected a list of paths, got {self.describe(node)}")
            return _BAD
        paths = [self.path_value(item, f"{kp}[{i}]") for i, item in enumerate(node.value)]
        return [p for p in paths if p is not _BAD]

    def environment(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, None)
        if fields is None:
            return _BAD
        env = {}
        for key, (knode, vnode) in fields.items():
            if not ENV_NAME.match(key):
                self.error(knode, _join(kp, key), "not a valid environment variable name")
                continue
            value = self.scalar(vnode)
            if isinstance(value, str):
                env[key] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                # The text as written: `1.10` stays "1.10", not "1.1".
                env[key] = vnode.value
            else:
                quote = "; quote it" if isinstance(value, bool) else ""
                self.error(vnode, _join(kp, key),
                           f"expected a string or a number, got {self.describe(vnode)}{quote}")
        return env

    def options(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, None)
        if fields is None:
            return _BAD
        options = {}
        for key, (knode, vnode) in fields.items():
            if not key.isidentifier():
                # Options become keyword arguments of the engine's constructor.
                self.error(knode, _join(kp, key), "option names must be Python identifiers")
                continue
            value = self.plain(vnode, _join(kp, key), set())
            if value is not _BAD:
                options[key] = value
        return options

    def plain(self, node: Node, kp: str, active: set[int]) -> Any:
        """A JSON-able value (the daemon spec is JSON): null, bool, number, string, list, mapping."""
        if id(node) in active:
            self.error(node, kp, "a recursive alias cannot be passed to a daemon")
            return _BAD
        if not isinstance(node, ScalarNode) and node.tag not in (_SEQ, _MAP):
            # `!!set`, `!!omap`, `!custom [...]`: not plain lists and mappings.
            self.error(node, kp, f"{self.describe(node)} cannot be passed to a daemon")
            return _BAD
        if isinstance(node, SequenceNode):
            active.add(id(node))
            items = [self.plain(item, f"{kp}[{i}]", active) for i, item in enumerate(node.value)]
            active.discard(id(node))
            return _BAD if any(i is _BAD for i in items) else items
        if isinstance(node, MappingNode):
            fields = self.mapping(node, kp, None)
            if fields is None:
                return _BAD
            active.add(id(node))
            out = {k: self.plain(v, _join(kp, k), active) for k, (_, v) in fields.items()}
            active.discard(id(node))
            return _BAD if any(v is _BAD for v in out.values()) else out
        value = self.scalar(node)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        kind = type(value).__name__ if value is not _BAD else self.describe(node)
        self.error(node, kp, f"{kind} cannot be passed to a daemon (its spec is JSON); "
                             "quote it to pass a string")
        return _BAD

    # -- paths

    def expand(self, value: str, node: Node, kp: str) -> Any:
        # os.path.expandvars leaves unknown variables as they are, which would
        # make a directory literally named "$FOO": report them instead.
        unset = [m.group(1) or m.group(2) for m in _ENV_REF.finditer(value)
                 if (m.group(1) or m.group(2)) not in os.environ]
        if unset:
            self.error(node, kp, "environment variable " + ", ".join(f"${v}" for v in unset)
                                 + " is not set")
            return _BAD
        return os.path.expanduser(os.path.expandvars(value))

    def resolve(self, value: str) -> Path:
        return Path(os.path.abspath(self.base / value))


def _join(kp: str, key: str) -> str:
    return f"{kp}.{key}" if kp else key


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
