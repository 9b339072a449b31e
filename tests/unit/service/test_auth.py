"""The authorisation table: total, and what each role may do on whose runs."""

from __future__ import annotations

from typing import get_args

import pytest

from stowplan.service.auth import ALLOWED, Action, Principal, Scope, allowed, scope_of
from stowplan.spec.models import ServiceRole

ROLES: tuple[ServiceRole, ...] = get_args(ServiceRole)


def test_the_table_is_total() -> None:
    assert set(ALLOWED) == {(r, a) for r in ROLES for a in Action}


# (role, action) -> scopes allowed, written out by hand from the issue (not from ALLOWED)
EXPECTED = {
    ("viewer", "read"): {"own", "team"},
    ("viewer", "submit"): set(),
    ("viewer", "cancel"): set(),
    ("member", "read"): {"own", "team"},
    ("member", "submit"): {"own"},
    ("member", "cancel"): {"own"},
    ("team-admin", "read"): {"own", "team"},
    ("team-admin", "submit"): {"own"},
    ("team-admin", "cancel"): {"own", "team"},
    ("admin", "read"): {"own", "team", "other"},
    ("admin", "submit"): {"own"},
    ("admin", "cancel"): {"own", "team", "other"},
    # approvals: a team admin decides on its team's runs (its own too), an admin on all
    ("viewer", "approve"): set(),
    ("member", "approve"): set(),
    ("team-admin", "approve"): {"own", "team"},
    ("admin", "approve"): {"own", "team", "other"},
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("scope", list(Scope))
def test_allowed(role: ServiceRole, action: Action, scope: Scope) -> None:
    assert allowed(role, action, scope) == (scope.value in EXPECTED[(role, action.value)])


def test_scope_of() -> None:
    mona = Principal(user="mona", team="vision", role="member")
    assert scope_of(mona, [("vision", "mona")]) is Scope.OWN
    assert scope_of(mona, [("nlp", "nora"), ("vision", "mike")]) is Scope.TEAM
    assert scope_of(mona, [("nlp", "mona")]) is Scope.OTHER  # same name, other team
    assert scope_of(mona, []) is Scope.OTHER  # started outside the service
