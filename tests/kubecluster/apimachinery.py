"""Pure helpers that follow the upstream API machinery: Status objects, quantities, selectors,
name and label validation, patches and index interval strings.

Nothing here does I/O or keeps state; the emulator (``store.py``, ``server.py``) and the
controllers (``controllers.py``) build on these.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

JSON = dict[str, Any]


# --- Status objects ---------------------------------------------------------------------------
# https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/status/
# https://kubernetes.io/docs/reference/using-api/api-concepts/#response-status-kind


class ApiError(Exception):
    """An error answered as a ``Status`` object with the HTTP code of its ``code`` field."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: JSON | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = dict(headers or {})

    def status(self) -> JSON:
        return status_object(self.code, self.reason, self.message, self.details)


def status_object(code: int, reason: str, message: str, details: JSON | None = None) -> JSON:
    out: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        out["details"] = details
    return out


def qualified(plural: str, group: str) -> str:
    """``jobs.batch`` / ``pods``: how the API server names a resource in its messages."""
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{qualified(plural, group)} "{name}" not found',
        _details(plural, group, name),
    )


def already_exists(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{qualified(plural, group)} "{name}" already exists',
        _details(plural, group, name),
    )


def conflict(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(plural, group)} "{name}": the object has '
        "been modified; please apply your changes to the latest version and try again",
        _details(plural, group, name),
    )


def invalid(kind: str, group: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
    """422 Invalid; ``causes`` are (field path, message) pairs."""
    what = f"{kind}.{group}" if group else kind
    text = "; ".join(f"{field}: {msg}" for field, msg in causes)
    details = {
        "name": name,
        "kind": kind,
        "causes": [
            {"reason": "FieldValueInvalid", "message": msg, "field": field} for field, msg in causes
        ],
    }
    if group:
        details["group"] = group
    return ApiError(422, "Invalid", f'{what} "{name}" is invalid: {text}', details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _details(plural: str, group: str, name: str) -> JSON:
    d: JSON = {"name": name, "kind": plural}
    if group:
        d["group"] = group
    return d


# --- time ---------------------------------------------------------------------------------------


def rfc3339(ts: float) -> str:
    """Kubernetes timestamps: RFC 3339, UTC, second precision (``metav1.Time``)."""
    return datetime.datetime.fromtimestamp(int(ts), tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float:
    return (
        datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )


# --- quantities ---------------------------------------------------------------------------------
# https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/quantity/

_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[numkMGTPE]i?|)$")


def parse_quantity(value: str | int | float) -> Decimal:
    if isinstance(value, int | float):
        return Decimal(str(value))
    m = _QUANTITY.match(value.strip())
    if m is None or (m.group(2).endswith("i") and m.group(2)[0] in "num"):
        raise ValueError(f"quantities must match the regular expression {_QUANTITY.pattern!r}")
    number, suffix = m.groups()
    if suffix[:1] in ("e", "E"):
        return Decimal(number + suffix)
    if suffix == "k" or suffix in _SUFFIX:
        return Decimal(number) * _SUFFIX[suffix]
    raise ValueError(f"unknown quantity suffix {suffix!r}")


# --- names and labels ---------------------------------------------------------------------------
# https://kubernetes.io/docs/concepts/overview/working-with-objects/names/
# https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def dns_subdomain_errors(name: str) -> list[str]:
    out = []
    if len(name) > 253:
        out.append("must be no more than 253 characters")
    if not _DNS1123_SUBDOMAIN.match(name):
        out.append(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
            "'-' or '.', and must start and end with an alphanumeric character"
        )
    return out


def dns_label_errors(name: str) -> list[str]:
    out = []
    if len(name) > 63:
        out.append("must be no more than 63 characters")
    if not _DNS1123_LABEL.match(name):
        out.append(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
            "'-', and must start and end with an alphanumeric character"
        )
    return out


def label_key_errors(key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    out = []
    if "/" in key and (not prefix or dns_subdomain_errors(prefix)):
        out.append(f"prefix part of {key!r} must be a DNS subdomain")
    if len(name) > 63:
        out.append(f"name part of {key!r} must be no more than 63 characters")
    if not _LABEL_NAME.match(name):
        out.append(
            f"name part of {key!r} must consist of alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character"
        )
    return out


def label_value_errors(value: object) -> list[str]:
    if not isinstance(value, str):
        return ["must be a string"]
    out = []
    if len(value) > 63:
        out.append("must be no more than 63 characters")
    if value and not _LABEL_NAME.match(value):
        out.append(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', "
            "'_' or '.', and must start and end with an alphanumeric character"
        )
    return out


def metadata_errors(meta: JSON, *, name_rule: str = "subdomain") -> list[tuple[str, str]]:
    """Field errors of ``metadata`` that every object shares (name, labels, annotations)."""
    causes: list[tuple[str, str]] = []
    name = meta.get("name")
    if isinstance(name, str) and name:
        check = dns_label_errors if name_rule == "label" else dns_subdomain_errors
        causes += [("metadata.name", f"Invalid value: {name!r}: {e}") for e in check(name)]
    labels = meta.get("labels") or {}
    for k, v in labels.items():
        causes += [("metadata.labels", f"Invalid value: {k!r}: {e}") for e in label_key_errors(k)]
        causes += [("metadata.labels", f"Invalid value: {v!r}: {e}") for e in label_value_errors(v)]
    annotations = meta.get("annotations") or {}
    size = sum(len(k) + len(str(v)) for k, v in annotations.items())
    if size > 256 * 1024:
        causes.append(("metadata.annotations", "Too long: must have at most 262144 bytes"))
    for k in annotations:
        causes += [
            ("metadata.annotations", f"Invalid value: {k!r}: {e}") for e in label_key_errors(k)
        ]
    return causes


# --- label and field selectors ------------------------------------------------------------------
# https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors
# https://kubernetes.io/docs/concepts/overview/working-with-objects/field-selectors/

Requirement = tuple[str, str, frozenset[str]]  # key, operator, values


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


_SET_REQ = re.compile(r"^([^\s!=()]+)\s+(in|notin)\s*\(([^)]*)\)$")


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Equality-based (``=``, ``==``, ``!=``) and set-based (``in``, ``notin``, ``key``,
    ``!key``) requirements, ANDed."""
    if not text:
        return []
    out: list[Requirement] = []
    for part in _split_top_level(text):
        m = _SET_REQ.match(part)
        if m:
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            out.append((m.group(1), m.group(2), values))
        elif "!=" in part:
            k, v = part.split("!=", 1)
            out.append((k.strip(), "!=", frozenset([v.strip()])))
        elif "==" in part:
            k, v = part.split("==", 1)
            out.append((k.strip(), "=", frozenset([v.strip()])))
        elif "=" in part:
            k, v = part.split("=", 1)
            out.append((k.strip(), "=", frozenset([v.strip()])))
        elif part.startswith("!"):
            out.append((part[1:].strip(), "!", frozenset()))
        elif re.match(r"^[^\s!=()]+$", part):
            out.append((part, "exists", frozenset()))
        else:
            raise bad_request(f"unable to parse requirement: {part!r}")
    for key, _, _ in out:
        if label_key_errors(key):
            raise bad_request(f"invalid label key {key!r}")
    return out


def labels_match(requirements: Iterable[Requirement], labels: Mapping[str, str]) -> bool:
    for key, op, values in requirements:
        has = key in labels
        if op == "=" and not (has and labels[key] in values):
            return False
        if op in ("!=", "notin") and has and labels[key] in values:
            return False
        if op == "in" and not (has and labels[key] in values):
            return False
        if op == "exists" and not has:
            return False
        if op == "!" and has:
            return False
    return True


def match_label_selector_object(selector: JSON, labels: Mapping[str, str]) -> bool:
    """A ``LabelSelector`` object (``matchLabels`` + ``matchExpressions``)."""
    reqs: list[Requirement] = [
        (k, "=", frozenset([v])) for k, v in (selector.get("matchLabels") or {}).items()
    ]
    for expr in selector.get("matchExpressions") or []:
        op = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}[
            expr["operator"]
        ]
        reqs.append((expr["key"], op, frozenset(expr.get("values") or [])))
    return labels_match(reqs, labels)


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    """(dotted field path, equal?, value); ``=``, ``==`` and ``!=`` as upstream supports."""
    if not text:
        return []
    out = []
    for part in _split_top_level(text):
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append((k.strip(), False, v.strip()))
        elif "==" in part or "=" in part:
            k, v = part.split("==", 1) if "==" in part else part.split("=", 1)
            out.append((k.strip(), True, v.strip()))
        else:
            raise bad_request(f"invalid field selector: {part!r}")
    return out


def fields_match(requirements: Iterable[tuple[str, bool, str]], obj: JSON) -> bool:
    for path, equal, value in requirements:
        cur: Any = obj
        for step in path.split("."):
            cur = cur.get(step) if isinstance(cur, dict) else None
        actual = "" if cur is None else str(cur)
        if (actual == value) != equal:
            return False
    return True


# --- patches ------------------------------------------------------------------------------------
# https://kubernetes.io/docs/tasks/manage-kubernetes-objects/update-api-object-kubectl-patch/

# NOTE: the patchMergeKey of the list fields a driver is likely to patch. A strategic merge patch
# merges these lists element-wise by key; every other list is replaced, as JSON merge patch does.
STRATEGIC_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
}


def merge_patch(target: Any, patch: Any, *, strategic: bool = False, field: str = "") -> Any:
    """RFC 7386 JSON merge patch; with ``strategic`` the keyed lists above merge by key."""
    if strategic and isinstance(patch, list) and isinstance(target, list):
        key = STRATEGIC_MERGE_KEYS.get(field)
        if key is not None and all(isinstance(x, dict) and key in x for x in patch + target):
            out = [copy.deepcopy(x) for x in target]
            for item in patch:
                for i, cur in enumerate(out):
                    if cur[key] == item[key]:
                        out[i] = merge_patch(cur, item, strategic=True)
                        break
                else:
                    out.append(copy.deepcopy(item))
            return out
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v, strategic=strategic, field=k)
    return result


def json_patch(target: JSON, ops: list[JSON]) -> JSON:
    """RFC 6902 (add, remove, replace, test, copy, move)."""
    doc = copy.deepcopy(target)

    def split(pointer: str) -> list[str]:
        if pointer == "":
            return []
        return [p.replace("~1", "/").replace("~0", "~") for p in pointer.lstrip("/").split("/")]

    def parent(pointer: str) -> tuple[Any, str]:
        parts = split(pointer)
        cur: Any = doc
        for p in parts[:-1]:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur, parts[-1]

    def get(pointer: str) -> Any:
        cur: Any = doc
        for p in split(pointer):
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur

    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        try:
            if kind == "test":
                if get(path) != op.get("value"):
                    raise ApiError(422, "Invalid", f"testing value {path} failed")
                continue
            if kind in ("copy", "move"):
                value = copy.deepcopy(get(op["from"]))
                if kind == "move":
                    p, k = parent(op["from"])
                    del p[int(k) if isinstance(p, list) else k]
                kind, op = "add", {"path": path, "value": value}
            p, k = parent(path)
            if kind == "add":
                if isinstance(p, list):
                    p.insert(len(p) if k == "-" else int(k), copy.deepcopy(op["value"]))
                else:
                    p[k] = copy.deepcopy(op["value"])
            elif kind == "replace":
                if isinstance(p, list):
                    p[int(k)] = copy.deepcopy(op["value"])
                else:
                    if k not in p:
                        raise KeyError(k)
                    p[k] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del p[int(k) if isinstance(p, list) else k]
            else:
                raise bad_request(f"unknown JSON patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ApiError(
                422,
                "Invalid",
                f"the server rejected our request due to an error in our "
                f"request: jsonpatch {kind} operation does not apply: {path} ({e})",
            ) from e
    return doc


# --- index intervals ----------------------------------------------------------------------------
# https://kubernetes.io/docs/concepts/workloads/controllers/job/#completion-mode :
# "The completed indexes are represented in a text format ... e.g. 1,3-5,7"


def format_intervals(indexes: Iterable[int]) -> str:
    xs = sorted(set(indexes))
    out: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def parse_intervals(text: str | None) -> set[int]:
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return out
