"""Write ``docs/reference.md`` from the schema, so the reference cannot drift from the code.

``python -m stowplan.cli.docgen`` rewrites the file; ``--check`` exits 1 when it is out of date
(the test suite runs the same comparison). The field tables come from
``msgspec.json.schema_components`` of the spec Structs in :mod:`stowplan.spec.models` (types,
bounds, patterns, defaults, required fields) and from the docstrings written under each field;
the sections on the task environment, placeholders, sweep methods and parameter types are
written by hand below, next to the code they describe.

The generator reads only what the schema says; a constraint or a field added to a model shows
up on the next run without touching this file. Schema shapes it does not know are printed as
their JSON, never dropped.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any, Final

import msgspec

OUTPUT: Final = Path(__file__).resolve().parents[2] / "docs" / "reference.md"

_INT64_MAX: Final = 2**63 - 1
_FLOAT_MAX: Final = sys.float_info.max


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stowplan.cli.docgen", description=__doc__)
    p.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    p.add_argument("--output", type=Path, default=OUTPUT)
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} is out of date: run python -m stowplan.cli.docgen",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


# -- the schema --------------------------------------------------------------------------------


def render() -> str:
    """The whole of ``docs/reference.md``."""
    from stowplan.spec import models

    roots = [
        ("Experiment file", models.Experiment, "the experiment file (TOML or YAML)"),
        ("Project file: stowplan.toml", models.ProjectConfig, "stowplan.toml"),
    ]
    (*refs,), defs = msgspec.json.schema_components([r[1] for r in roots])
    field_docs = _field_docstrings(Path(inspect.getfile(models)))
    out = [HEADER]
    seen: set[str] = set()
    for (title, _, where), ref in zip(roots, refs, strict=True):
        out.append(f"## {title}\n")
        for name, path in _walk(_ref_name(ref), defs, where, seen):
            out.append(_component(name, defs[name], path, field_docs.get(name, {})))
    out.append(_text_kinds())
    out += [TASK_ENVIRONMENT, PLACEHOLDERS, SWEEPS, PARAMETER_TYPES]
    return "\n".join(part.rstrip("\n") + "\n" for part in out)


def _ref_name(schema: dict[str, Any]) -> str:
    return str(schema["$ref"]).rsplit("/", 1)[-1]


def _walk(root: str, defs: dict[str, Any], where: str, seen: set[str]) -> list[tuple[str, str]]:
    """Components reachable from ``root``, breadth first, each with where it is written."""
    order: list[tuple[str, str]] = []
    queue = [(root, where)]
    while queue:
        name, path = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        order.append((name, path))
        for field, sub in defs[name].get("properties", {}).items():
            for ref, suffix in _refs(sub):
                queue.append(
                    (ref, f"{field}{suffix}" if path == where else f"{path}.{field}{suffix}")
                )
    return order


def _refs(schema: Any, suffix: str = "") -> list[tuple[str, str]]:
    """Component names used by a field's schema, with ``[]`` or ``.<name>`` for the nesting."""
    if not isinstance(schema, dict):
        return []
    if "$ref" in schema:
        return [(_ref_name(schema), suffix)]
    out: list[tuple[str, str]] = []
    for alt in schema.get("anyOf", []):
        out += _refs(alt, suffix)
    if "items" in schema:
        out += _refs(schema["items"], suffix + "[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _refs(schema["additionalProperties"], suffix + ".<name>")
    return out


def _component(name: str, schema: dict[str, Any], path: str, docs: dict[str, str]) -> str:
    lines = [f"### {name}\n", f"Written at: `{path}`\n"]
    if schema.get("description"):
        lines.append(_prose(schema["description"]) + "\n")
    if "enum" in schema:
        lines.append("One of: " + ", ".join(f"`{v}`" for v in schema["enum"]) + ".\n")
        return "\n".join(lines)
    props: dict[str, Any] = schema.get("properties", {})
    if not props:
        lines.append(f"```json\n{json.dumps(schema, indent=2, sort_keys=True)}\n```\n")
        return "\n".join(lines)
    required = set(schema.get("required", []))
    lines.append("| field | type | default | description |")
    lines.append("|---|---|---|---|")
    for field, sub in props.items():
        if field in required:
            default = "required"
        elif "default" not in sub:
            default = "see its table" if _refs(sub) else ""
        else:
            default = "not set" if sub["default"] is None else f"`{_value(sub['default'])}`"
        doc = docs.get(field, "")
        if not doc and sub.get("pattern") is None:
            doc = sub.get("description", "")
        lines.append(
            f"| `{field}` | {_cell(_type(sub))} | {_cell(default)} | {_cell(_prose(doc))} |"
        )
    return "\n".join(lines) + "\n"


def _type(s: Any) -> str:
    """A person's reading of a JSON schema fragment."""
    if not isinstance(s, dict):
        return f"`{json.dumps(s)}`"
    if "$ref" in s:
        n = _ref_name(s)
        return f"[{n}](#{n.lower()})"
    if "enum" in s:
        return " or ".join(f"`{_value(v)}`" for v in s["enum"])
    if "anyOf" in s:
        alts = [a for a in s["anyOf"] if a != {"type": "null"}]
        text = " or ".join(_type(a) for a in alts)
        if "discriminator" in s:
            text += f" (chosen by `{s['discriminator']['propertyName']}`)"
        return text
    t = s.get("type")
    if t == "array":
        return f"list of {_group(_type(s.get('items', {})))}"
    if t == "object":
        keys = s.get("propertyNames", {})
        key = _pattern_text(keys["pattern"]) if "pattern" in keys else "string"
        value = _type(s.get("additionalProperties", {})) if "additionalProperties" in s else "any"
        return f"table of {key} to {_group(value)}"
    if t in ("integer", "number"):
        return {"integer": "integer", "number": "number"}[t] + _bounds(s)
    if t == "string":
        if "pattern" in s:
            return _pattern_text(s["pattern"])
        return "string"
    if t in ("boolean", "null"):
        return str(t)
    if not s:
        return "any"
    return f"`{json.dumps(s, sort_keys=True)}`"


def _group(text: str) -> str:
    return f"({text})" if " or " in text else text


def _bounds(s: dict[str, Any]) -> str:
    low = (
        f"> {_num(s['exclusiveMinimum'])}"
        if "exclusiveMinimum" in s
        else (f">= {_num(s['minimum'])}" if "minimum" in s else "")
    )
    high = (
        f"< {_num(s['exclusiveMaximum'])}"
        if "exclusiveMaximum" in s
        else (f"<= {_num(s['maximum'])}" if "maximum" in s else "")
    )
    if s.get("maximum") == _FLOAT_MAX and s.get("minimum") == -_FLOAT_MAX:
        return " (finite)"
    if s.get("maximum") == _INT64_MAX and s.get("minimum") == -_INT64_MAX:
        return " (64-bit)"
    parts = [p for p in (low, high) if p]
    return f" ({', '.join(parts)})" if parts else ""


def _num(v: Any) -> str:
    if v == _INT64_MAX:
        return "2^63-1"
    if isinstance(v, int) and v >= 1 << 20 and v & (v - 1) == 0:
        return f"2^{v.bit_length() - 1}"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return str(v)


def _pattern_names() -> dict[str, str]:
    """Each pattern constant of the models (``NAME_PATTERN``, ...) -> its kind (``name``)."""
    from stowplan.spec import models

    return {
        v: k.removesuffix("_PATTERN").lower()
        for k, v in vars(models).items()
        if k.endswith("_PATTERN") and isinstance(v, str)
    }


def _pattern_text(pattern: str) -> str:
    name = _pattern_names().get(pattern)
    return f"[{name}](#text-kinds)" if name is not None else f"text matching `{pattern}`"


def _text_kinds() -> str:
    """A legend of the text kinds the field tables name, from the models' own descriptions."""
    from stowplan.spec import models

    described: dict[str, str] = getattr(models, "PATTERNS", {})
    lines = [
        "### Text kinds\n",
        "What each kind of text in the tables above accepts.\n",
        "| kind | accepts |",
        "|---|---|",
    ]
    for pattern, name in sorted(_pattern_names().items(), key=lambda kv: kv[1]):
        lines.append(f"| {name} | {_cell(described.get(pattern, f'`{pattern}`'))} |")
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    return json.dumps(v)


def _prose(text: str) -> str:
    """Docstring text as Markdown: one paragraph per blank line, ``code`` as `code`."""
    text = inspect.cleandoc(text)
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n\n", "<br>").replace("\n", " ")


def _field_docstrings(source: Path) -> dict[str, dict[str, str]]:
    """``{class: {field: docstring}}``: the string literal written under a class attribute."""
    out: dict[str, dict[str, str]] = {}
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        body = node.body
        for a, b in itertools.pairwise(body):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = b.value.value
        out[node.name] = docs
    return out


# -- written by hand -------------------------------------------------------------------------

HEADER: Final = """\
# stowplan reference

<!-- Generated by `python -m stowplan.cli.docgen` from stowplan/spec/models.py and the
     sections in stowplan/cli/docgen.py. Do not edit by hand: a test fails when this file is
     out of date. -->

What an experiment file and `stowplan.toml` may contain, field by field, and what a task sees
when it runs. Sizes (`memory`, `size`) take bytes or text such as `"4GiB"` or `"512MB"`;
durations (`timeout`, `walltime`, `runtime`) take seconds or text such as `"30m"`, `"2h"` or
`"1:30:00"`. Every number must be finite (no `nan`, no `inf`) and within the bounds shown. An
unknown field is an error that lists the valid ones.

Contents: [Experiment file](#experiment-file) ·
[Project file](#project-file-stowplantoml) · [Task environment](#task-environment) ·
[Placeholders](#placeholders) · [Sweep methods](#sweep-methods) ·
[Parameter types](#parameter-types)
"""

TASK_ENVIRONMENT: Final = """\
## Task environment

A task runs in its own attempt directory (a fresh one per attempt), with the variables of its
`env` table and these, set by stowplan:

| variable | value |
|---|---|
| `STOWPLAN_RUN_ID` | the run's id (64 hex digits): the same for every attempt of the run |
| `STOWPLAN_ATTEMPT` | the attempt number, from 1 |
| `STOWPLAN_ATTEMPT_DIR` | the attempt directory, which is also the working directory; `outputs` \
are read from it |
| `STOWPLAN_KEY` | Slurm only: the attempt's idempotency key (also the job's comment) |
| `STOWPLAN_UPSTREAM` | only for a task with `depends_on`: the path (relative to the attempt \
directory) of `upstream.json`, which describes the upstream runs |

### Reading upstream outputs

`upstream.json` is a JSON list with one entry per upstream run, sorted by task and trial index:

```json
[
  {
    "run_id": "5fcde6c4c11c...",
    "task": "train",
    "index": 0,
    "params": {"lr": 0.01},
    "outputs": {"metrics.json": "/path/to/the/stored/copy"}
  }
]
```

`outputs` maps each declared output name of that run to the path of its stored
(content-addressed) copy. Read the files there; do not write to them. A downstream run starts
only after every upstream run has succeeded, so every declared output is present. For example:

```python
import json, os

upstream = json.load(open(os.environ["STOWPLAN_UPSTREAM"]))
scores = {u["run_id"]: json.load(open(u["outputs"]["metrics.json"]))["score"] for u in upstream}
best = max(scores, key=scores.get)
```
"""

PLACEHOLDERS: Final = """\
## Placeholders

In a task's `command`, `script` and `env` values, these are replaced before the task runs:

| placeholder | replaced by |
|---|---|
| `{name}` | the value of sweep parameter `name` for this trial (`true`/`false` for booleans) |
| `{seed}` | the run's seed: the experiment's `seed` plus the replicate number |
| `{run_id}` | the run's id |
| `{experiment_dir}` | the directory that holds the experiment file |

Write `{{` and `}}` for literal braces (in a shell `script`, `${{HOME}}` gives `${HOME}`). A
placeholder that names nothing above is an error when the file is loaded.
"""

SWEEPS: Final = """\
## Sweep methods

A task with a `sweep` table becomes one run per trial; `parameters` maps each parameter name to
its domain (see [Parameter types](#parameter-types)).

| method | trials | needs |
|---|---|---|
| `grid` (default) | the cross product of the parameters' values, in the order written | every \
parameter a list of values, a `choice` or an `int` range; no `samples` |
| `random` | `samples` points drawn uniformly (numpy PCG64, seeded by `seed`) | `samples` |
| `sobol` | `samples` points of a scrambled Sobol sequence (scipy, seeded by `seed`): they cover \
the space more evenly than random draws | `samples` |

The same sweep and `seed` give the same trials, in the same order, on every machine. Every
trial is its own run, even when two trials draw the same values. `max_concurrent` caps how many
trials of the task run at once. `[policy] max_sweep_size` caps the number of trials.

```toml
[[tasks]]
name = "train"
command = ["python", "train.py", "--lr", "{lr}", "--layers", "{layers}"]
sweep = { method = "random", samples = 20, seed = 1, parameters = { lr = { type = "loguniform", \
low = 1e-4, high = 1e-1 }, layers = [2, 4, 8] } }
```
"""

PARAMETER_TYPES: Final = """\
## Parameter types

| domain | written as | values |
|---|---|---|
| list | `[1, 2, 3]` or `["rbf", "linear"]` | exactly these (strings, integers, finite numbers, \
booleans); in a `random` or `sobol` sweep, one of them is drawn |
| `choice` | `{ type = "choice", values = [...] }` | as a list |
| `int` | `{ type = "int", low = 1, high = 8 }` | integers from `low` to `high`, both included (a \
grid takes all of them) |
| `uniform` | `{ type = "uniform", low = 0.0, high = 1.0 }` | numbers from `low` to `high` \
(`random` and `sobol` only) |
| `loguniform` | `{ type = "loguniform", low = 1e-4, high = 1e-1 }` | numbers from `low` to \
`high`, uniform in their logarithm; `0 < low` (`random` and `sobol` only) |
"""


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
