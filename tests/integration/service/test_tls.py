"""``[service.tls]``: a real ``stowplan serve`` speaking HTTPS on the loopback with a
certificate from a lab CA made here, and the CLI against it with ``--server https://...``.

The CLI trusts what ``SSL_CERT_FILE`` names (httpx reads it, as OpenSSL's tools do); without
it the lab's certificate is refused, and plain HTTP to the TLS port fails: each an exit 2
whose message says what to do."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import httpx
import pytest

from stowplan.cli.main import main
from tests.integration.service.conftest import Service, lab, poll
from tests.integration.service.test_authz import seed

pytestmark = pytest.mark.integration


def make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """A lab CA, and a server certificate it signed for 127.0.0.1 and localhost: the CA's
    PEM, the certificate's and its key's."""
    # cryptography is always there: asyncssh (the Slurm provider's transport) needs it
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stowplan test lab CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    d.mkdir(parents=True, exist_ok=True)
    ca_pem, cert_pem, key_pem = d / "ca.pem", d / "server.pem", d / "server.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_pem.chmod(0o600)
    return ca_pem, cert_pem, key_pem


def test_the_cli_speaks_https_to_a_tls_service_trusting_the_labs_ca(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca, _, _ = make_ca_and_cert(tmp_path / "tls")
    tokens = lab(tmp_path)
    with (tmp_path / "stowplan.toml").open("a") as f:  # relative to the project, as documented
        f.write('\n[service.tls]\ncert = "tls/server.pem"\nkey = "tls/server.key"\n')
    seed(tmp_path)
    svc = Service(tmp_path, read_only=True)
    https = f"https://127.0.0.1:{svc.port}"
    http = f"http://127.0.0.1:{svc.port}"
    trusted = ssl.create_default_context(cafile=str(ca))

    def healthy() -> bool | None:
        if svc.proc.poll() is not None:
            raise AssertionError(f"serve exited {svc.proc.returncode}:\n{svc.text()}")
        try:
            return httpx.get(f"{https}/healthz", verify=trusted, timeout=2).status_code == 200
        except httpx.TransportError:
            return None

    def cli(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err

    try:
        poll("the service to answer over HTTPS", 60, healthy)
        monkeypatch.chdir(tmp_path.parent)  # no project here: the server's
        monkeypatch.delenv("STOWPLAN_SERVER", raising=False)
        monkeypatch.setenv("STOWPLAN_TOKEN", tokens["ada"])
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)

        # the lab's CA trusted: the CLI works over HTTPS
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        rc, out, err = cli("ls", "--server", https)
        assert rc == 0, err
        assert {"cats", "words", "orphan"} <= set(out.split()), out
        monkeypatch.setenv("STOWPLAN_SERVER", https)
        rc, out, err = cli("status", "cats")
        assert rc == 0, err
        monkeypatch.delenv("STOWPLAN_SERVER")

        # plain HTTP to the TLS port: refused, and the message says to use https://
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{http}/healthz", timeout=5)
        rc, out, err = cli("ls", "--server", http)
        assert rc == 2 and not out, (out, err)
        assert f"cannot reach the service at {http}" in err, err
        assert "https://" in err, err

        # the CA not trusted (the system's bundle only): the certificate is refused, and the
        # message says how to trust it
        monkeypatch.delenv("SSL_CERT_FILE")
        rc, out, err = cli("ls", "--server", https)
        assert rc == 2 and not out, (out, err)
        assert "certificate" in err and "SSL_CERT_FILE" in err, err
    finally:
        assert svc.stop() == 0, svc.text()
