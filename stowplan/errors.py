"""The one error root, with branches by who must act.

``SpecError``: the user must fix an input file. ``ProviderError``: a provider refused or
failed (``retryable`` says whether trying again can help). ``PlacementInfeasible``: nothing
can run a task. ``InternalError``: a bug in stowplan.
"""

from __future__ import annotations

from typing import Any


class StowplanError(Exception):
    """Root of every error stowplan raises on purpose."""


class SpecError(StowplanError, ValueError):
    """Something a user wrote is wrong.

    Carries the file, the ``$.path`` inside it, the line when the parser can tell, what was
    wrong and how to fix it, so the CLI prints one short paragraph and exits with code 2.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        path: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.path = path
        self.line = line
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        where = self.file or ""
        if self.file and self.line is not None:
            where += f":{self.line}"
        if self.path:
            where += f" at {self.path}"
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class ProviderError(StowplanError):
    """A provider failed or refused; ``retryable`` tells the retry policy whether to try again."""

    retry_after: float | None = None
    """for a retryable error: the provider asked to be called again no sooner than this many
    seconds (an HTTP ``Retry-After``); the shell waits at least that long."""

    def __init__(self, message: str, *, provider: str, retryable: bool) -> None:
        self.provider = provider
        self.retryable = retryable
        self.message = message
        super().__init__(f"{provider}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only arguments do not survive pickling by default; Ray pickles an error that
        # crosses from a provider actor to the queue, and the shell decides on ``retryable``
        # (a subclass's own attributes, an HTTP status say, travel in the state)
        return (
            _provider_error,
            (type(self), self.message, self.provider, self.retryable),
            dict(self.__dict__),
        )


def _provider_error(
    cls: type[ProviderError], message: str, provider: str, retryable: bool
) -> ProviderError:
    err = cls.__new__(cls)
    ProviderError.__init__(err, message, provider=provider, retryable=retryable)
    return err


class PlacementInfeasible(StowplanError):
    """No configured pool can ever run a task as declared."""


class InternalError(StowplanError):
    """A broken invariant inside stowplan: a bug to report, never the user's fault."""
