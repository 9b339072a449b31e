"""Reading experiment files and ``stowplan.toml`` into typed specs, with errors users can act on.

Every failure is a ``SpecError`` naming the file, the ``$.path``, the line where it can be
found, and a fix. Checks that need the whole file (unique names, known and acyclic
dependencies, placeholders, sweep size) run after decoding, before anything is written.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
import string
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import msgspec.inspect as mi
import yaml

from stowplan.errors import SpecError
from stowplan.spec.models import (
    PATTERNS,
    Choice,
    Experiment,
    IntRange,
    Policy,
    ProjectConfig,
    Sweep,
    Task,
)

T = TypeVar("T")

BUILTIN_PLACEHOLDERS = frozenset({"seed", "run_id", "experiment_dir"})
PROJECT_FILE = "stowplan.toml"
MAX_FILE_BYTES: Final = 16 << 20
"""Experiment and project files are at most 16 MiB."""
MAX_DEPTH: Final = 32
"""Nesting of tables, arrays and mappings in a file (an experiment needs about 7)."""
MAX_YAML_ALIASES: Final = 1_000
MAX_YAML_ALIAS_EXPANSION: Final = 1_000_000
"""What all aliases of a YAML file together may expand to: characters plus values."""
_PATH_TOKEN = re.compile(r'\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars.

    YAML 1.1 reads ``on``/``off``/``yes``/``no`` as booleans, so ``retry: {on: [lost]}`` had a
    key ``True``; it reads ``1:30`` as base-60 ``90`` where TOML's ``"1:30"`` is 1 h 30 min; and
    it turns ``2024-01-01`` into a date that no text field accepts. Here only true/false are
    booleans, numbers are decimal (or 0x/0o), and everything else is text.
    """


_YamlLoader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag
        not in (
            "tag:yaml.org,2002:bool",
            "tag:yaml.org,2002:int",
            "tag:yaml.org,2002:float",
            "tag:yaml.org,2002:timestamp",
        )
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|0o[0-7_]+)$"),
    list("-+0123456789"),
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


class _YamlLimitError(yaml.composer.ComposerError):
    """A YAML document over one of the limits below; its own message, not "not valid YAML"."""


class _YamlDuplicateKeyError(yaml.composer.ComposerError):
    """A mapping with the same key twice (TOML refuses these; so does stowplan's YAML)."""


class _LimitedYamlLoader(_YamlLoader):
    """``_YamlLoader`` with limits on nesting, aliases and what aliases expand to.

    PyYAML composes recursively (a 20,000-deep document is a RecursionError), and an alias is
    a reference that every consumer expands: 2,000 aliases of one 200 KB string are 400 MB
    once converted, and nested aliases ("billion laughs") grow exponentially. Each node's size
    (one per node, plus the length of scalars) is known once it is composed, so an alias adds
    its target's whole size to a running total. Duplicate mapping keys are rejected here, on
    the document as written (merge keys, ``<<``, may still override).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._expanded = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            target = self.anchors.get(event.anchor)
            if target is not None:
                self._aliases += 1
                self._expanded += self._sizes.get(id(target), 1)
                if self._aliases > MAX_YAML_ALIASES:
                    raise _YamlLimitError(
                        None,
                        None,
                        f"more than {MAX_YAML_ALIASES:,} aliases (*name)",
                        event.start_mark,
                    )
                if self._expanded > MAX_YAML_ALIAS_EXPANSION:
                    raise _YamlLimitError(
                        None,
                        None,
                        "aliases (*name) expand to more than "
                        f"{MAX_YAML_ALIAS_EXPANSION:,} characters and values",
                        event.start_mark,
                    )
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                deep = self.peek_event()  # type: ignore[no-untyped-call]
                raise _YamlLimitError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", deep.start_mark
                )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, yaml.ScalarNode):
            size += len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes.get(id(c), 1) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(
                self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value
            )
        self._sizes[id(node)] = size
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            k = (key.tag, key.value)
            if k in first:
                raise _YamlDuplicateKeyError(
                    None,
                    None,
                    f"duplicate key {key.value!r} (first on line {first[k]})",
                    key.start_mark,
                )
            first[k] = key.start_mark.line + 1
        return node


def _toml_depth(text: str) -> tuple[int, int]:
    """The deepest nesting of brackets, braces and dotted keys outside strings and comments,
    and its line.

    tomllib parses arrays and inline tables recursively, and takes quadratic time over the
    parts of a dotted key; this cheap pass runs first so that 100,000 ``[`` or a key of
    50,000 parts give a SpecError, not a RecursionError or a minute of parsing. A malformed
    file may be misjudged, but only deep nesting is refused here; tomllib reports the rest.
    """
    depth = deepest = 0
    line = deepest_line = 1
    opened: list[str] = []
    in_key, dots = True, 0  # at a key (a line's start, a header, after "{" or "," in a table)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            if not opened or opened[-1] == "[header":
                in_key, dots = True, 0
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        elif c in "\"'":
            quote = c * 3 if text.startswith(c * 3, i) else c
            j = i + len(quote)
            while j < n and not text.startswith(quote, j):
                if text[j] == "\\" and c == '"':
                    j += 1
                elif text[j] == "\n":
                    if len(quote) == 1:
                        break  # unterminated: tomllib says so
                    line += 1
                j += 1
            i = j + len(quote)
            continue
        elif c in "[{":
            header = c == "[" and not opened and in_key
            opened.append("[header" if header else c)
            in_key, dots = header or c == "{", 0
            depth += 1
        elif c in "]}":
            if opened:
                opened.pop()
            depth = max(0, depth - 1)
        elif c == "=":
            in_key = False
        elif c == "," and opened and opened[-1] == "{":
            in_key, dots = True, 0
        elif c == "." and in_key:
            dots += 1
        here = depth + (dots if in_key else 0)
        if here > deepest:
            deepest, deepest_line = here, line
        i += 1
    return deepest, deepest_line


def _check_depth(path: Path, raw: Any) -> None:
    """Refuse data nested deeper than ``MAX_DEPTH`` (dotted TOML keys nest without brackets);
    iterative, so any depth is checked without recursion."""
    stack: list[tuple[Any, int, str]] = [(raw, 0, "$")]
    while stack:
        obj, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise SpecError(
                f"nested deeper than {MAX_DEPTH} levels",
                file=str(path),
                path=where if len(where) < 120 else where[:117] + "...",
                hint="an experiment or project file needs a few levels; flatten the data",
            )
        if isinstance(obj, dict):
            stack.extend((v, depth + 1, where + _key_part(str(k))) for k, v in obj.items())
        elif isinstance(obj, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(obj))


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        deepest, deep_line = _toml_depth(text)
        if deepest > MAX_DEPTH:
            raise SpecError(
                f"arrays, tables or dotted keys nested deeper than {MAX_DEPTH} levels",
                file=str(path),
                line=deep_line,
                hint="an experiment or project file needs a few levels; flatten the data",
            )
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            line = _line_from_message(str(e))
            raise SpecError(
                f"not valid TOML: {e}",
                file=str(path),
                line=line,
                hint="check quoting, brackets and '=' on that line",
            ) from None
        except RecursionError:  # pragma: no cover - _toml_depth refuses deep nesting first
            raise SpecError(
                "nested too deeply to parse", file=str(path), hint="flatten the data"
            ) from None
        _check_depth(path, raw)
        return raw
    if suffix in (".yaml", ".yml"):
        try:
            raw = yaml.load(text, Loader=_LimitedYamlLoader)
        except _YamlLimitError as e:
            mark = e.problem_mark
            raise SpecError(
                f"YAML {e.problem}; stowplan refuses such documents",
                file=str(path),
                line=mark.line + 1 if mark is not None else None,
                hint="write the values out, or use fewer aliases (&name / *name)",
            ) from None
        except _YamlDuplicateKeyError as e:
            mark = e.problem_mark
            raise SpecError(
                f"YAML {e.problem}; a mapping takes each key once",
                file=str(path),
                line=mark.line + 1 if mark is not None else None,
                hint="remove one of the two, or rename it",
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise SpecError(
                f"not valid YAML: {getattr(e, 'problem', None) or e}",
                file=str(path),
                line=mark.line + 1 if mark is not None else None,
                hint="check indentation and quoting on that line",
            ) from None
        except RecursionError:  # pragma: no cover - the loader refuses deep nesting first
            raise SpecError(
                "nested too deeply to parse", file=str(path), hint="flatten the data"
            ) from None
        _check_depth(path, raw)
        return raw
    raise SpecError(
        f"unknown file type {suffix!r}",
        file=str(path),
        hint="name the file *.toml, *.yaml or *.yml",
    )


def _line_from_message(msg: str) -> int | None:
    m = re.search(r"line (\d+)", msg)
    return int(m.group(1)) if m else None


def _key_part(key: str) -> str:
    """``.name`` in a ``$.path``, or ``["odd key"]`` for a key that is not plain."""
    return "." + key if _PLAIN_KEY.fullmatch(key) else "[" + json.dumps(key) + "]"


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for key, idx, quoted in _PATH_TOKEN.findall(path.removeprefix("$")):
        if quoted:
            parts.append(str(json.loads(quoted)))
        else:
            parts.append(int(idx) if idx else key)
    return parts


def _join_path(parts: Iterable[str | int]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else _key_part(p) for p in parts)


def locate(file: Path, text: str, path: str) -> int | None:
    """Best-effort line of ``$.a.b[2].c`` in a TOML or YAML file, or None."""
    parts = _split_path(path)
    if not parts:
        return None
    if file.suffix.lower() in (".yaml", ".yml"):
        return _locate_yaml(text, parts)
    return _locate_toml(text, parts)


def _locate_yaml(text: str, parts: list[str | int]) -> int | None:
    try:
        node: Any = yaml.compose(text, Loader=_LimitedYamlLoader)
    except (yaml.YAMLError, RecursionError):
        return None
    line = None
    for part in parts:
        if node is None:
            break
        if isinstance(part, int) and isinstance(node, yaml.SequenceNode):
            if part >= len(node.value):
                break
            node = node.value[part]
        elif isinstance(part, str) and isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == part:
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                break
            continue
        else:
            break
        line = node.start_mark.line + 1
    return line


def _toml_header(names: list[str], counts: dict[str, int]) -> list[str | int]:
    """``[tasks.resources]`` after ``[[tasks]]`` is ``tasks[<latest>].resources``."""
    out: list[str | int] = []
    for k, name in enumerate(names[:-1]):
        out.append(name)
        prefix = ".".join(names[: k + 1])
        if prefix in counts:
            out.append(counts[prefix])
    out.append(names[-1])
    return out


def _locate_toml(text: str, parts: list[str | int]) -> int | None:
    """Walk table headers: ``[[tasks]]`` occurrences count as indexes, then find the key."""
    lines = text.splitlines()
    header: list[str | int] = []
    counts: dict[str, int] = {}
    best: int | None = None
    key_re = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")
    for no, raw in enumerate(lines, 1):
        s = raw.strip()
        if s.startswith("["):
            s = s.split("#", 1)[0].strip()  # [[tasks]]  # a comment
        if s.startswith("[["):
            name = s.strip("[] ")
            counts[name] = counts.get(name, -1) + 1
            for sub in [c for c in counts if c.startswith(name + ".")]:
                del counts[sub]  # [[tasks.inputs]] counts afresh under each [[tasks]]
            header = [*_toml_header(name.split("."), counts), counts[name]]
        elif s.startswith("["):
            header = _toml_header(s.strip("[] ").split("."), counts)
        else:
            m = key_re.match(raw)
            if not m:
                continue
            key = m.group(1).strip("\"'")
            full = [*header, key]
            if full == parts[: len(full)]:
                best = no
                if len(full) == len(parts):
                    return no
            continue
        if header == parts[: len(header)]:
            best = no
    return best


_MSGSPEC_PATH = re.compile(r" - at (`key` in )?`(\$[^`]*)`$")
_SYNONYMS: Final = {
    "trials": "samples",
    "n": "samples",
    "num_samples": "samples",
    "n_samples": "samples",
    "count": "samples",
    "deps": "depends_on",
    "needs": "depends_on",
    "after": "depends_on",
    "requires": "depends_on",
    "cmd": "command",
    "run": "command",
    "args": "command",
    "mem": "memory",
    "ram": "memory",
    "cores": "cpus",
    "cpu": "cpus",
    "gpu": "gpus",
    "params": "parameters",
    "type": "kind",
    "retries": "retry",
    "time": "timeout",
    "environment": "env",
    "input": "inputs",
    "output": "outputs",
}
"""What people write for a field that has another name here."""


def _check_against(raw: Any, type_: Any) -> str | None:
    try:
        msgspec.convert(raw, type_)
    except msgspec.ValidationError as e:
        return str(e)
    return None


def _with_only(raw: Any, parts: list[str | int], key: str) -> Any:
    """A copy of ``raw`` where the mapping at ``parts`` holds only ``key`` (copies on the path
    only)."""
    if not parts:
        return {key: raw[key]}
    head, rest = parts[0], parts[1:]
    if isinstance(raw, dict):
        return {**raw, head: _with_only(raw[head], rest, key)}
    out = list(raw)
    i = int(head)
    out[i] = _with_only(raw[i], rest, key)
    return out


def _at(raw: Any, parts: list[str | int]) -> Any:
    for p in parts:
        if not isinstance(raw, dict | list):
            return None
        try:
            raw = raw[p]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _name_dict_values(msg: str, raw: Any, type_: Any) -> str:
    """msgspec writes ``$.providers[...]`` for a value in a mapping; find the key that fails in
    the same way (convert the document with only that key) and name it:
    ``$.providers.campus``. Nested mappings are named one level at a time: each reduced
    document must still fail with the message msgspec first gave."""
    first = msg
    while "[...]" in msg:
        m = _MSGSPEC_PATH.search(msg)
        if m is None:
            return msg
        path = m.group(2)
        prefix = path[: path.index("[...]")]
        parts = _split_path(prefix)
        container = _at(raw, parts)
        if not isinstance(container, dict) or len(container) > 1000:
            return msg
        for key in container:
            reduced = _with_only(raw, parts, key)
            if _check_against(reduced, type_) == first:
                named = prefix + _key_part(str(key)) + path[len(prefix) + len("[...]") :]
                msg = msg[: m.start(2)] + named + msg[m.end(2) :]
                raw = reduced
                break
        else:
            return msg
    return msg


def _unwrap(t: Any, raw: Any) -> Any:
    """The msgspec type a raw value is checked against: through metadata and optional types,
    and to the member of a tagged union that the value's tag names."""
    while True:
        if isinstance(t, mi.Metadata):
            t = t.type
        elif isinstance(t, mi.UnionType):
            members = [m for m in t.types if not isinstance(m, mi.NoneType)]
            structs = [m for m in members if isinstance(m, mi.StructType)]
            tagged = [m for m in structs if m.tag_field is not None]
            if tagged and isinstance(raw, dict):
                want = raw.get(tagged[0].tag_field)
                match = [m for m in tagged if m.tag == want]
                if not match:
                    return t
                t = match[0]
            elif len(members) == 1:
                t = members[0]
            elif len(structs) == 1 and isinstance(raw, dict):
                t = structs[0]
            else:
                return t
        else:
            return t


def _type_at(type_: Any, raw: Any, parts: list[str | int]) -> Any:
    t = mi.type_info(type_)
    for p in parts:
        t = _unwrap(t, raw)
        if isinstance(t, mi.StructType) and isinstance(p, str):
            fields = {f.encode_name: f for f in t.fields}
            if p not in fields:
                return None
            t = fields[p].type
        elif isinstance(t, mi.DictType):
            t = t.value_type
        elif isinstance(t, mi.ListType) and isinstance(p, int):
            t = t.item_type
        else:
            return None
        raw = raw.get(p) if isinstance(raw, dict) else _at(raw, [p])
    return _unwrap(t, raw)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: str, valid: list[str]) -> str:
    close = _SYNONYMS.get(word.lower())
    if close not in valid:
        matches = difflib.get_close_matches(word.lower(), valid, n=1, cutoff=0.6)
        close = matches[0] if matches else None
    return f"did you mean {close!r}? " if close else ""


def _pattern_text(pattern: str) -> str:
    return PATTERNS.get(pattern, f"must match {pattern!r}")


def _number_text(n: float) -> str:
    if isinstance(n, int) or (n.is_integer() and abs(n) < 2**53):
        return f"{int(n):,}"
    return f"{n:g}"


def _explain(detail: str, path: str, is_key: bool, raw: Any, type_: Any) -> tuple[str, str, str]:
    """(message, $.path, fix) for one msgspec error, in words a person can act on."""
    parts = _split_path(path)
    value = _at(raw, parts)
    if detail.startswith("Expected") and isinstance(value, float) and not math.isfinite(value):
        return (
            f"must be a finite number, got {value}",
            path,
            "NaN and infinity are not accepted; give a number",
        )
    unknown = re.match(r"Object contains unknown field `([^`]+)`", detail)
    if unknown:
        name = unknown.group(1)
        t = _type_at(type_, raw, parts)
        valid = [f.encode_name for f in t.fields] if isinstance(t, mi.StructType) else []
        message = f"unknown field `{name}`"
        hint = _suggest(name, valid) + (
            "the fields here are: " + ", ".join(valid) if valid else "remove it"
        )
        return message, path + _key_part(name), hint
    missing = re.match(r"Object missing required field `([^`]+)`", detail)
    if missing:
        name = missing.group(1)
        t = _type_at(type_, raw, parts)
        if isinstance(t, mi.UnionType):
            tags = [m.tag for m in t.types if isinstance(m, mi.StructType) and m.tag is not None]
            if tags:
                return (
                    f"missing field `{name}`",
                    path + _key_part(name),
                    f"add {name} = one of: " + ", ".join(map(str, tags)),
                )
        return f"missing required field `{name}`", path + _key_part(name), f"add {name}"
    if detail.startswith("Invalid value") and parts and isinstance(parts[-1], str):
        t = _type_at(type_, raw, parts[:-1])
        if isinstance(t, mi.UnionType):
            tags = [m.tag for m in t.types if isinstance(m, mi.StructType) and m.tag is not None]
            if tags:
                return (
                    f"unknown {parts[-1]} {_show(value)}",
                    path,
                    f"use one of: {', '.join(map(str, tags))}",
                )
    if detail.startswith("Invalid enum value"):
        t = _type_at(type_, raw, parts)
        if isinstance(t, mi.EnumType):
            values = [str(getattr(v, "value", v)) for v in t.cls]
        elif isinstance(t, mi.LiteralType):
            values = [str(v) for v in t.values]
        else:
            values = []
        if values:
            return f"unknown value {_show(value)}", path, "use one of: " + ", ".join(values)
    regex = re.match(r"Expected `str` matching regex '(.*)'$", detail, re.S)
    if regex:
        pattern = regex.group(1).encode().decode("unicode_escape")
        if is_key and isinstance(value, dict):
            bad = next((k for k in value if not re.search(pattern, str(k))), None)
            return (
                f"key {_show(bad)}: {_pattern_text(pattern)}",
                path,
                "rename that key",
            )
        return f"{_show(value)}: {_pattern_text(pattern)}", path, "change the value"
    bound = re.match(r"Expected `(int|float)` (>=|<=|>|<) (\S+)$", detail)
    if bound:
        limit = float(bound.group(3)) if bound.group(1) == "float" else int(bound.group(3))
        words = {">=": "at least", "<=": "at most", ">": "more than", "<": "less than"}
        return (
            f"must be {words[bound.group(2)]} {_number_text(limit)}, got {_show(value)}",
            path,
            "change the value so that it meets that limit",
        )
    if detail.startswith("Expected"):
        return detail, path, "change the value to the expected type"
    # our own checks (__post_init__) say what is accepted in the message itself
    field_name = re.match(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*): ", detail)
    if field_name:
        path = _join_path([*parts, *_split_path("$." + field_name.group(1))])
        detail = detail[field_name.end() :]
    return detail, path, "change the value as the message says"


def _validation_error(
    file: Path, text: str, e: msgspec.ValidationError, raw: Any = None, type_: Any = None
) -> SpecError:
    msg = str(e)
    if type_ is not None:
        msg = _name_dict_values(msg, raw, type_)
    m = _MSGSPEC_PATH.search(msg)
    path = m.group(2) if m else "$"  # msgspec leaves the path out at the top level
    detail = msg[: m.start()] if m else msg
    # msgspec names the object that holds a bad field, not the field: point at the field,
    # so the line found is the typo's (unknown fields) or the value's
    if type_ is None:
        message, path, hint = detail, path, "change the value as the message says"
    else:
        message, path, hint = _explain(detail, path, bool(m and m.group(1)), raw, type_)
    line = locate(file, text, path)
    return SpecError(message, file=str(file), path=path, line=line, hint=hint)


def decode(file: Path, text: str, raw: Any, type_: type[T]) -> T:
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as e:
        raise _validation_error(file, text, e, raw, type_) from None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class LoadedProject(msgspec.Struct, frozen=True, kw_only=True):
    config: ProjectConfig
    file: str | None
    root: str
    raw_policy: dict[str, Any]


class LoadedExperiment(msgspec.Struct, frozen=True, kw_only=True):
    """An experiment as read, with its effective policy (project defaults, then overrides)."""

    spec: Experiment
    policy: Policy
    file: str
    directory: str
    text: str


def find_project_file(start: Path) -> Path | None:
    """The nearest ``stowplan.toml`` from ``start`` upward; something else by that name (a
    directory, a pipe) is returned too, and refused when read, rather than skipped."""
    for d in [start, *start.parents]:
        candidate = d / PROJECT_FILE
        if candidate.exists():
            return candidate
    return None


def load_project(path: Path | None = None, *, search_from: Path | None = None) -> LoadedProject:
    """Load ``stowplan.toml`` (given, or found upward from ``search_from``), or the defaults."""
    if path is None and search_from is not None:
        path = find_project_file(search_from.resolve())
    if path is None:
        root = (search_from or Path.cwd()).resolve()
        return LoadedProject(config=ProjectConfig(), file=None, root=str(root), raw_policy={})
    text = _read(path)
    raw = _parse(path, text)
    if not isinstance(raw, dict):
        raise SpecError("expected a table at the top level", file=str(path))
    config = decode(path, text, raw, ProjectConfig)
    return LoadedProject(
        config=config,
        file=str(path),
        root=str(path.resolve().parent),
        raw_policy=dict(raw.get("policy") or {}),
    )


_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _read(path: Path) -> str:
    """The text of a spec file: a regular UTF-8 file of at most ``MAX_FILE_BYTES``.

    Opened without blocking and checked with fstat before reading, so a FIFO or a device is
    refused at once instead of waiting forever for a writer. A leading UTF-8 byte-order mark
    (what some Windows editors write) is dropped.
    """
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpecError("file not found", file=name, hint="check the path") from None
    except PermissionError:
        raise SpecError(
            "cannot read: permission denied", file=name, hint="check the file's permissions"
        ) from None
    except OSError as e:
        raise SpecError(
            f"cannot open: {e.strerror or e}", file=name, hint="check the path"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a file")
        raise SpecError(
            f"is {kind}, not a regular file",
            file=name,
            hint="give the path of a .toml or .yaml file",
        )
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise SpecError(f"cannot read: {e.strerror or e}", file=name) from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(
            f"is larger than {MAX_FILE_BYTES >> 20} MiB; stowplan reads spec files up to that",
            file=name,
            hint="is this the right file? Generate large sweeps with sweep ranges instead",
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SpecError(
            "is UTF-16 text (it starts with a UTF-16 byte-order mark)",
            file=name,
            hint="save the file as UTF-8",
        )
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            f"is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
            file=name,
            line=data[: e.start].count(b"\n") + 1,
            hint="save the file as UTF-8",
        ) from None


def load_experiment(path: Path, project: LoadedProject | None = None) -> LoadedExperiment:
    """Read, decode and check an experiment file; raise ``SpecError`` on the first problem."""
    text = _read(path)
    raw = _parse(path, text)
    if not isinstance(raw, dict):
        raise SpecError(
            "expected a table with [experiment] and [[tasks]] at the top level",
            file=str(path),
            hint="see examples/quickstart.toml",
        )
    spec = decode(path, text, raw, Experiment)
    if project is None:
        project = load_project(search_from=path.resolve().parent)
    merged = deep_merge(project.raw_policy, raw.get("policy") or {})
    policy = decode(path, text, {"policy": merged}, _PolicyHolder).policy
    loaded = LoadedExperiment(
        spec=spec,
        policy=policy,
        file=str(path),
        directory=str(path.resolve().parent),
        text=text,
    )
    check_experiment(loaded)
    return loaded


class _PolicyHolder(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    policy: Policy


def spec_error(loaded: LoadedExperiment, path: str, message: str, hint: str) -> SpecError:
    """A SpecError at ``path`` of a loaded experiment, with its file and line."""
    file = Path(loaded.file)
    return SpecError(
        message, file=loaded.file, path=path, line=locate(file, loaded.text, path), hint=hint
    )


_err = spec_error


def sweep_size(sweep: Sweep) -> int:
    if sweep.method != "grid":
        assert sweep.samples is not None
        return sweep.samples
    n = 1
    for dom in sweep.parameters.values():
        if isinstance(dom, list):
            n *= len(dom)
        elif isinstance(dom, Choice):
            n *= len(dom.values)
        elif isinstance(dom, IntRange):
            n *= dom.high - dom.low + 1
        else:  # pragma: no cover - rejected by Sweep.__post_init__
            raise AssertionError(dom)
    return n


def placeholders(template: str) -> set[str]:
    """Names used as ``{name}`` in a template; raises ValueError on malformed braces."""
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # a lone "{" or "}"
        raise ValueError(f"{e}; write {{{{ and }}}} for literal braces") from None
    for _, fieldname, spec, conv in parsed:
        if fieldname is None:
            continue
        if spec or conv:
            shown = _show(
                "{" + fieldname + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            )
            raise ValueError(
                f"{shown}: format specs (':...') and conversions ('!r') are not supported; "
                f"write {{{fieldname}}}, or {{{{ for a literal brace"
            )
        if not fieldname or not fieldname.isidentifier():
            raise ValueError(
                f"{_show('{' + fieldname + '}')} is not a placeholder; a placeholder is "
                "{name} with a sweep parameter or built-in name; write {{ for a literal brace"
            )
        names.add(fieldname)
    return names


def check_experiment(loaded: LoadedExperiment) -> None:
    spec = loaded.spec
    if not spec.tasks:
        raise _err(loaded, "$.tasks", "an experiment needs at least one task", "add [[tasks]]")
    index: dict[str, int] = {}
    for i, task in enumerate(spec.tasks):
        if task.name in index:
            raise _err(
                loaded,
                f"$.tasks[{i}].name",
                f"task name {task.name!r} is used twice (also by $.tasks[{index[task.name]}])",
                "give every task a unique name",
            )
        index[task.name] = i
    for i, task in enumerate(spec.tasks):
        for j, dep in enumerate(task.depends_on):
            if dep not in index:
                known = ", ".join(sorted(index))
                raise _err(
                    loaded,
                    f"$.tasks[{i}].depends_on[{j}]",
                    f"depends on {dep!r}, which is not a task of this experiment",
                    f"use one of: {known}",
                )
            if dep == task.name:
                raise _err(
                    loaded,
                    f"$.tasks[{i}].depends_on[{j}]",
                    "a task cannot depend on itself",
                    "remove it",
                )
            if spec.tasks[index[dep]].service_spec is not None:
                raise _err(
                    loaded,
                    f"$.tasks[{i}].depends_on[{j}]",
                    f"task {task.name!r} depends on {dep!r}, a service: a service runs until "
                    "it is cancelled and never completes, so this task would never start",
                    f"remove {dep!r} from depends_on (reach the service at its endpoint, shown "
                    "by stowplan status), or make it a normal task",
                )
        if task.service_spec is not None and task.timeout is not None:
            raise _err(
                loaded,
                f"$.tasks[{i}].timeout",
                f"task {task.name!r} is a service, which runs until it is cancelled; a timeout "
                "would stop every attempt and restart it",
                "remove timeout (stop the service with stowplan cancel)",
            )
    cycle = _find_cycle({t.name: list(t.depends_on) for t in spec.tasks})
    if cycle:
        first = index[cycle[0]]
        raise _err(
            loaded,
            f"$.tasks[{first}].depends_on",
            "dependency cycle: " + _cycle_text(cycle),
            "remove one of these dependencies",
        )
    cap = loaded.policy.max_sweep_size
    total = 0
    for i, task in enumerate(spec.tasks):
        size = sweep_size(task.sweep) if task.sweep else 1
        total += size
        if size > cap or total > cap:
            raise _err(
                loaded,
                f"$.tasks[{i}].sweep",
                f"this expands to {size:,} trial{'s' if size != 1 else ''} ({total:,} so far); "
                f"the cap is {cap:,}",
                "shrink the sweep, or raise policy.max_sweep_size if you mean it",
            )
        params = set(task.sweep.parameters) if task.sweep else set()
        allowed = params | BUILTIN_PLACEHOLDERS
        templates = (
            [(f"$.tasks[{i}].command[{k}]", a) for k, a in enumerate(task.command or [])]
            + ([(f"$.tasks[{i}].script", task.script)] if task.script else [])
            + [(f"$.tasks[{i}].env.{k}", v) for k, v in task.env.items()]
        )
        for where, tmpl in templates:
            try:
                used = placeholders(tmpl)
            except ValueError as e:
                raise _err(loaded, where, str(e), "escape literal braces as {{ and }}") from None
            unknown = used - allowed
            if unknown:
                raise _err(
                    loaded,
                    where,
                    f"unknown placeholder {{{sorted(unknown)[0]}}}",
                    "use a sweep parameter or one of "
                    + ", ".join("{" + n + "}" for n in sorted(allowed)),
                )


def _cycle_text(cycle: list[str]) -> str:
    """``a -> b -> a``; a long cycle shows its first and last few tasks and a count."""
    names = [*cycle, cycle[0]]
    if len(names) <= 12:
        return " -> ".join(names)
    hidden = len(names) - 8
    return " -> ".join([*names[:4], f"... ({hidden:,} more) ...", *names[-4:]])


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle (its tasks in order), or None. Iterative depth-first search: a chain
    of 10^5 tasks needs no recursion."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for root in sorted(graph):
        if color[root] != WHITE:
            continue
        path: list[str] = [root]
        todo: list[Iterator[str]] = [iter(sorted(graph[root]))]
        color[root] = GREY
        while todo:
            m = next(todo[-1], None)
            if m is None:
                todo.pop()
                color[path.pop()] = BLACK
            elif color[m] == GREY:
                return path[path.index(m) :]
            elif color[m] == WHITE:
                color[m] = GREY
                path.append(m)
                todo.append(iter(sorted(graph[m])))
    return None


def task_order(tasks: Sequence[Task]) -> list[str]:
    """Task names, dependencies first, ties in file order: a depth-first post-order, without
    recursion (the loader has rejected cycles and unknown names)."""
    deps = {t.name: t.depends_on for t in tasks}
    done: list[str] = []
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            continue
        seen.add(t.name)
        stack: list[tuple[str, Iterator[str]]] = [(t.name, iter(deps[t.name]))]
        while stack:
            name, rest = stack[-1]
            d = next(rest, None)
            if d is None:
                stack.pop()
                done.append(name)
            elif d not in seen:
                seen.add(d)
                stack.append((d, iter(deps[d])))
    return done
