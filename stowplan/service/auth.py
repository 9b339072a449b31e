"""Who may do what: one table, consulted by every endpoint, server-side.

Roles (``[service.users.NAME] role``): ``viewer`` reads its team's experiments and runs;
``member`` also submits, and cancels runs it submitted; ``team-admin`` also cancels any run
of its team and approves or rejects its runs waiting for approval; ``admin`` does
everything, on every team's runs (and sees runs started outside the service, which no team
owns). Another team's experiment is refused (403), never shown.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final

import msgspec

from stowplan.spec.models import ServiceConfig, ServiceRole


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The person behind a request, as the configuration says now."""

    user: str
    team: str
    role: ServiceRole


class Action(enum.Enum):
    READ = "read"
    SUBMIT = "submit"
    CANCEL = "cancel"
    APPROVE = "approve"
    """approve or reject a run waiting for approval."""


class Scope(enum.Enum):
    """Whose experiment an action touches, seen from the caller."""

    OWN = "own"
    """the caller submitted it."""
    TEAM = "team"
    """someone of the caller's team submitted it."""
    OTHER = "other"
    """only other teams did, or nobody did through the service."""


ALLOWED: Final[dict[tuple[ServiceRole, Action], frozenset[Scope]]] = {
    ("viewer", Action.READ): frozenset({Scope.OWN, Scope.TEAM}),
    ("viewer", Action.SUBMIT): frozenset(),
    ("viewer", Action.CANCEL): frozenset(),
    ("viewer", Action.APPROVE): frozenset(),
    ("member", Action.READ): frozenset({Scope.OWN, Scope.TEAM}),
    ("member", Action.SUBMIT): frozenset({Scope.OWN}),
    ("member", Action.CANCEL): frozenset({Scope.OWN}),
    ("member", Action.APPROVE): frozenset(),
    ("team-admin", Action.READ): frozenset({Scope.OWN, Scope.TEAM}),
    ("team-admin", Action.SUBMIT): frozenset({Scope.OWN}),
    ("team-admin", Action.CANCEL): frozenset({Scope.OWN, Scope.TEAM}),
    ("team-admin", Action.APPROVE): frozenset({Scope.OWN, Scope.TEAM}),
    ("admin", Action.READ): frozenset(Scope),
    ("admin", Action.SUBMIT): frozenset({Scope.OWN}),
    ("admin", Action.CANCEL): frozenset(Scope),
    ("admin", Action.APPROVE): frozenset(Scope),
}
"""(role, action) -> the scopes it is allowed on. Total over roles and actions."""


def allowed(role: ServiceRole, action: Action, scope: Scope) -> bool:
    """The one lookup of ``ALLOWED``: a missing (role, action) pair is refused."""
    return scope in ALLOWED.get((role, action), frozenset())


def scope_of(who: Principal, owners: Sequence[tuple[str, str]]) -> Scope:
    """``owners``: (team, user) of each submission of the experiment."""
    if (who.team, who.user) in owners:
        return Scope.OWN
    if any(team == who.team for team, _ in owners):
        return Scope.TEAM
    return Scope.OTHER


def principal_of(config: ServiceConfig, user: str) -> Principal | None:
    """The user as configured now; None when the configuration no longer names them."""
    spec = config.users.get(user)
    if spec is None:
        return None
    return Principal(user=user, team=spec.team, role=spec.role)
