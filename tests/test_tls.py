"""amqps:// works for web and worker, and an untrusted certificate is refused.

A TLS-terminating proxy with a certificate from a test CA stands in front of
the real RabbitMQ; SSL_CERT_FILE tells both clients whether to trust it.
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Process, TcpProxy, free_port, require_tool, start_stack, wait_http


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    openssl = require_tool("openssl")
    folder = tmp_path_factory.mktemp("tls")

    def run(*arguments: str) -> None:
        subprocess.run([openssl, *arguments], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=onebox test CA",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (folder / "san.cnf").write_text("subjectAltName=DNS:localhost\n")
    # A certificate for the same name that no CA of the test signed.
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost", "-keyout", "stranger.key", "-out", "stranger.pem")  # fmt: skip
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "san.cnf", "-out", "server.pem")  # fmt: skip
    return folder


@pytest.fixture
def tls_proxy(certificates: Path) -> Iterator[TcpProxy]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    proxy = TcpProxy(tls=context)
    yield proxy
    proxy.close()


def test_web_and_worker_talk_to_the_broker_over_verified_tls(
    stacks: list[Process], queue_name: str, tls_proxy: TcpProxy, certificates: Path
) -> None:
    port = free_port()
    stack = start_stack(
        PORT=port, QUEUE_NAME=queue_name, CLOUDAMQP_URL=tls_proxy.url(), SSL_CERT_FILE=str(certificates / "ca.pem")
    )
    stacks.append(stack)
    wait_http(f"http://127.0.0.1:{port}/readyz")

    response = httpx.post(f"http://127.0.0.1:{port}/tasks", json={"seconds": 1})

    assert response.status_code == 202
    stack.wait_for(rf"task {response.json()['id']} done seconds=1")


def test_an_untrusted_certificate_is_refused(stacks: list[Process], queue_name: str, tls_proxy: TcpProxy) -> None:
    port = free_port()
    stack = start_stack(PORT=port, QUEUE_NAME=queue_name, CLOUDAMQP_URL=tls_proxy.url())
    stacks.append(stack)
    wait_http(f"http://127.0.0.1:{port}/healthz")

    stack.wait_for(r"\[onebox\] \[WARNING\] cannot reach the broker at .*: TLS failed: .*CERTIFICATE_VERIFY_FAILED")
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
    assert ready.status_code == 503
    assert "TLS failed" in ready.json()["detail"] and "CERTIFICATE_VERIFY_FAILED" in ready.json()["detail"]
    stack.wait_for(r"Consumer encountered a connection error: cannot reach the broker at .*: TLS failed: ")
    # One line per attempt: no traceback.
    assert "Traceback" not in stack.output


def test_a_certificate_that_becomes_trusted_is_served_without_a_restart(
    stacks: list[Process], queue_name: str, certificates: Path
) -> None:
    stranger = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stranger.load_cert_chain(certificates / "stranger.pem", certificates / "stranger.key")
    proxy = TcpProxy(tls=stranger)
    try:
        port = free_port()
        stack = start_stack(
            PORT=port, QUEUE_NAME=queue_name, CLOUDAMQP_URL=proxy.url(), SSL_CERT_FILE=str(certificates / "ca.pem")
        )
        stacks.append(stack)
        wait_http(f"http://127.0.0.1:{port}/readyz", status=503)
        stack.wait_for(r"Consumer encountered a connection error: cannot reach the broker at .*: TLS failed: ")

        trusted = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trusted.load_cert_chain(certificates / "server.pem", certificates / "server.key")
        proxy.tls = trusted
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=30)
        response = httpx.post(f"http://127.0.0.1:{port}/tasks", json={"seconds": 1})

        assert response.status_code == 202
        stack.wait_for(rf"task {response.json()['id']} done seconds=1", timeout=60)
        assert "Traceback" not in stack.output
    finally:
        proxy.close()
