"""A ProviderError crosses process boundaries (a provider actor to the queue) whole."""

from __future__ import annotations

import pickle

from stowplan.errors import ProviderError
from stowplan.providers.slurm.ssh import TransportLost


def test_a_provider_error_keeps_its_class_text_provider_and_retryable_through_pickle() -> None:
    for err in (
        ProviderError("throttled", provider="aws", retryable=True),
        ProviderError("no such partition", provider="campus", retryable=False),
        TransportLost("connection reset", provider="campus", retryable=True),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err)
        assert (str(back), back.provider, back.retryable) == (
            str(err),
            err.provider,
            err.retryable,
        )


def test_a_subclass_keeps_its_own_attributes_and_retry_after() -> None:
    from stowplan.providers.kubernetes.api import KubernetesError

    err = KubernetesError(
        "throttled", provider="k8s", retryable=True, status=429, reason="TooMany", retry_after=7
    )
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.reason, back.retry_after, back.retryable) == (
        429,
        "TooMany",
        7,
        True,
    )
