"""Reading experiment files and ``stowplan.toml`` into typed specs, with errors users can act on.

Every failure is a ``SpecError`` naming the file, the ``$.path``, the line where it can be
found, and a fix. Checks that need the whole file (unique names, known and acyclic
dependencies, placeholders, sweep size) run after decoding, before anything is written.
"""

from __future__ import annotations

import math
import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from stowplan.errors import SpecError
from stowplan.spec.models import (
    Choice,
    Experiment,
    IntRange,
    Policy,
    ProjectConfig,
    Sweep,
)

T = TypeVar("T")

BUILTIN_PLACEHOLDERS = frozenset({"seed", "run_id", "experiment_dir"})
PROJECT_FILE = "stowplan.toml"
_PATH_TOKEN = re.compile(r"\.([A-Za-z0-9_.\-]+?)(?=\.|\[|$)|\[(\d+)\]")


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


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            line = _line_from_message(str(e))
            raise SpecError(
                f"not valid TOML: {e}",
                file=str(path),
                line=line,
                hint="check quoting, brackets and '=' on that line",
            ) from None
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.load(text, Loader=_YamlLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise SpecError(
                f"not valid YAML: {getattr(e, 'problem', None) or e}",
                file=str(path),
                line=mark.line + 1 if mark is not None else None,
                hint="check indentation and quoting on that line",
            ) from None
    raise SpecError(
        f"unknown file type {suffix!r}",
        file=str(path),
        hint="name the file *.toml, *.yaml or *.yml",
    )


def _line_from_message(msg: str) -> int | None:
    m = re.search(r"line (\d+)", msg)
    return int(m.group(1)) if m else None


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for key, idx in _PATH_TOKEN.findall(path.removeprefix("$")):
        parts.append(int(idx) if idx else key)
    return parts


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
        node: Any = yaml.compose(text)
    except yaml.YAMLError:
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


def _validation_error(file: Path, text: str, e: msgspec.ValidationError) -> SpecError:
    msg = str(e)
    m = re.search(r" - at (?:`key` in )?`(\$[^`]*)`$", msg)
    path = m.group(1) if m else "$"  # msgspec leaves the path out at the top level
    detail = msg[: m.start()] if m else msg
    # msgspec names the object that holds a bad field, not the field: point at the field,
    # so the line found is the typo's (unknown fields) or the value's (our __post_init__
    # messages start with "field: ")
    field_name = re.match(r"Object contains unknown field `([^`]+)`", detail) or re.match(
        r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*): ", detail
    )
    if field_name:
        path += "." + field_name.group(1)
    hint = _hint_for(detail)
    line = locate(file, text, path)
    return SpecError(detail, file=str(file), path=path, line=line, hint=hint)


def _hint_for(detail: str) -> str:
    if detail.startswith("Object contains unknown field"):
        return "remove that field or fix its spelling; see examples/quickstart.toml for the shape"
    if detail.startswith("Expected"):
        if re.search(r"`\w+` (?:[<>]=?|matching|of length)", detail):
            return "change the value so that it meets that condition"
        return "change the value to the expected type"
    if "Object missing required field" in detail:
        return "add the missing field"
    if "Invalid enum value" in detail:
        return "use one of the values listed in the documentation"
    # our own checks (__post_init__) say what is accepted in the message itself
    return "change the value as the message says"


def decode(file: Path, text: str, raw: Any, type_: type[T]) -> T:
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as e:
        raise _validation_error(file, text, e) from None


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
    for d in [start, *start.parents]:
        candidate = d / PROJECT_FILE
        if candidate.is_file():
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


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("file not found", file=str(path), hint="check the path") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise SpecError(f"cannot read: {e}", file=str(path)) from None


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


def _err(loaded: LoadedExperiment, path: str, message: str, hint: str) -> SpecError:
    file = Path(loaded.file)
    return SpecError(
        message, file=loaded.file, path=path, line=locate(file, loaded.text, path), hint=hint
    )


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
    for _, fieldname, spec, conv in string.Formatter().parse(template):
        if fieldname is None:
            continue
        if not fieldname or spec or conv or not fieldname.isidentifier():
            raise ValueError(f"{{{fieldname}}} is not a placeholder; write {{{{ for a brace")
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
    cycle = _find_cycle({t.name: list(t.depends_on) for t in spec.tasks})
    if cycle:
        first = index[cycle[0]]
        raise _err(
            loaded,
            f"$.tasks[{first}].depends_on",
            "dependency cycle: " + " -> ".join([*cycle, cycle[0]]),
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
                f"this expands to {size:,} trials ({total:,} so far); the cap is {cap:,}",
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
        if not math.isfinite(task.resources.cpus):
            raise _err(loaded, f"$.tasks[{i}].resources.cpus", "must be finite", "use a number")


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph[n]):
            if color[m] == GREY:
                return stack[stack.index(m) :]
            if color[m] == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(graph):
        if color[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None
