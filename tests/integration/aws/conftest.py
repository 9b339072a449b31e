"""moto's server on the loopback for the AWS driver's tests (EC2, S3, STS, SSM over HTTP), with
the lossy proxy of ``proxy.py`` in front of it. aiobotocore reaches it through
``AWS_ENDPOINT_URL``. Nothing here is skipped: moto and aiobotocore are in the test extra."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.aws.proxy import LossyProxy

BUCKET = "stowplan-tests"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto's backends live in this process, shared by every server it starts: start clean
    import urllib.request

    urllib.request.urlopen(
        urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")
    ).close()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws(moto_url: str) -> Iterator[tuple[LossyProxy, Any]]:
    """(the proxy the driver talks to, a boto3 session straight to moto for the test's own
    look), with a bucket made."""
    import boto3  # type: ignore[import-untyped]

    with LossyProxy(moto_url) as proxy:
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": proxy.url,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            session = boto3.Session(region_name="us-east-1")

            def client(service: str) -> Any:
                return session.client(service, endpoint_url=moto_url)

            client("s3").create_bucket(Bucket=BUCKET)
            yield proxy, client
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
