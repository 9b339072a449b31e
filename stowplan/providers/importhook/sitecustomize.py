"""Record which installed distributions a Python process used, for its run's provenance.

The launcher puts this directory first on a task's ``PYTHONPATH`` and names a file in
``STOWPLAN_USED_FILE``. Every Python 3 interpreter started with that environment (the task,
and whatever Python it starts) imports this module at startup, as ``site`` does for any
``sitecustomize``; at interpreter exit it appends one JSON line to the file:

``{"v": 1, "pid", "executable", "implementation", "python", "prefix", "path",
"distributions": {normalised name: version}, "modules": {top-level module: name or null}}``

listing the top-level modules the process imported that are not part of the standard library
and not the task's own code (its script's directory), with the distribution behind each, and
the directories on its ``sys.path`` (where a check before reuse looks the versions up again).

Rules it keeps, in this order of importance:

- It never breaks the task: every error is swallowed, nothing is printed, the exit status is
  the task's. It does nothing at all without ``STOWPLAN_USED_FILE``.
- It chains: the ``sitecustomize`` it shadows (a distribution's, a venv's, Debian's) runs
  right after it, as it would have without it, errors included; then it takes its own
  directory off ``sys.path`` again.
- It costs little: standard library only, nothing imported at startup beyond what ``site``
  already has, and at exit it reads only the metadata directories next to the modules that
  were imported (a name match first, then ``top_level.txt``, then ``RECORD``), not every
  installed distribution as ``importlib.metadata.packages_distributions`` would.
- One line per process, written with a single ``O_APPEND`` write, so processes of one task
  do not interleave.

A process that ends by ``os._exit`` (a forked worker) or a signal writes nothing; its parent's
line still covers what the parent imported.
"""

from __future__ import annotations

import atexit
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_FILE = os.environ.get("STOWPLAN_USED_FILE")
_BEFORE = frozenset(sys.modules)
"""What ``site`` imported before this module (``.pth`` hooks): not the task's doing."""


def _norm(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _header(meta_dir: str) -> tuple[str, str] | None:
    for filename in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(meta_dir, filename), "rb") as f:
                head = f.read(8192)
        except OSError:
            continue
        name = version = None
        for line in head.decode("utf-8", "replace").splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            if key == "Name":
                name = value.strip()
            elif key == "Version":
                version = value.strip()
        if name and version:
            return name, version
    return None


class _Site:
    """The distributions whose metadata is in one directory, read as far as needed."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            names = []
        self.metas = [
            os.path.join(directory, n) for n in names if n.endswith((".dist-info", ".egg-info"))
        ]
        self._tops: dict[str, set[str]] = {}

    def by_name(self, module: str) -> str | None:
        want = _norm(module)
        for m in self.metas:
            base = os.path.basename(m).rsplit(".", 1)[0]
            if _norm(base.split("-", 1)[0]) == want:
                return m
        return None

    def tops(self, meta: str, deep: bool) -> set[str]:
        key = meta + ("#record" if deep else "")
        if key in self._tops:
            return self._tops[key]
        out: set[str] = set()
        try:
            if not deep:
                with open(os.path.join(meta, "top_level.txt"), encoding="utf-8") as f:
                    out = {line.strip() for line in f if line.strip()}
            else:
                with open(os.path.join(meta, "RECORD"), encoding="utf-8") as f:
                    for line in f:
                        first = line.split(",", 1)[0].split("/", 1)[0]
                        out.add(first.split(".", 1)[0])
        except OSError:
            pass
        self._tops[key] = out
        return out

    def providing(self, module: str) -> str | None:
        found = self.by_name(module)
        if found is not None:
            return found
        for deep in (False, True):
            for m in self.metas:
                if module in self.tops(m, deep):
                    return m
        return None


def _stdlib() -> frozenset[str]:
    names = getattr(sys, "stdlib_module_names", None)
    if names is not None:
        return frozenset(names) | frozenset(sys.builtin_module_names)
    return frozenset(sys.builtin_module_names)


def _locations(module: object) -> list[str]:
    paths = list(getattr(module, "__path__", None) or [])
    if paths:
        return [os.path.dirname(os.path.abspath(p)) for p in paths if isinstance(p, str)]
    f = getattr(module, "__file__", None)
    return [os.path.dirname(os.path.abspath(f))] if isinstance(f, str) else []


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _collect() -> dict[str, object]:
    import sysconfig

    stdlib = _stdlib()
    std_dirs = {os.path.abspath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    own = {os.path.abspath(p) for p in (os.getcwd(), sys.path[0] if sys.path else "") if p}
    own.add(_HERE)
    sites: dict[str, _Site] = {}

    def site(d: str) -> _Site:
        if d not in sites:
            sites[d] = _Site(d)
        return sites[d]

    search = [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)]
    # The sys.path entry a module was found under is the deepest one holding it: a venv
    # inside the script's directory is still a venv.
    entries = sorted({os.path.abspath(p or ".") for p in sys.path}, key=len, reverse=True)

    def own_code(where: list[str]) -> bool:
        for w in where:
            entry = next((e for e in entries if _inside(w, e)), None)
            if entry is None or entry not in own:
                return False
        return True

    modules: dict[str, str | None] = {}
    dists: dict[str, str] = {}
    for name, module in sorted(sys.modules.items()):
        if "." in name or name in stdlib or name in _BEFORE:
            continue
        if name in ("__main__", "sitecustomize", "usercustomize"):
            continue
        where = _locations(module)
        if not where:
            continue  # built in or frozen
        if own_code(where):
            continue  # the task's own code: its code version covers it
        if all(w in std_dirs for w in where):
            continue
        meta = None
        for d in where:
            meta = site(d).providing(name)
            if meta is not None:
                break
        if meta is None:
            # an editable install: the module is in its source tree, the metadata elsewhere
            for d in search:
                meta = site(d).by_name(name)
                if meta is not None:
                    break
        found = _header(meta) if meta is not None else None
        if found is None:
            modules[name] = None
            continue
        modules[name] = _norm(found[0])
        dists[_norm(found[0])] = found[1]
    impl = sys.implementation.name
    return {
        "v": 1,
        "pid": os.getpid(),
        "executable": sys.executable,
        "implementation": {"cpython": "CPython", "pypy": "PyPy"}.get(impl, impl),
        "python": ".".join(str(n) for n in sys.version_info[:3]),
        "prefix": sys.prefix,
        "path": search,
        "distributions": dict(sorted(dists.items())),
        "modules": modules,
    }


def _write(path: str) -> None:
    try:
        import json

        line = json.dumps(_collect(), sort_keys=True, separators=(",", ":")) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    except BaseException:
        pass  # recording must never change how a task ends


def _chain() -> None:
    """Run the ``sitecustomize`` this module shadows, as ``site`` would have."""
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("sitecustomize", None)
        raise  # site reports it, exactly as it would have without this hook


def _start() -> None:
    if _FILE and os.environ.get("STOWPLAN_RECORD_IMPORTS", "1") != "0":
        atexit.register(_write, _FILE)
    try:
        _chain()
    finally:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


_start()
