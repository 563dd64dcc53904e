"""TLS, mutual TLS and bearer tokens on the gRPC port, with certificates made at test time."""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from support import ServerThread, error_details, png, score_config

from align2.client import CurationClient, Sample, Turn
from align2.v1 import curation_pb2 as pb
from align2.v1 import curation_pb2_grpc as pb_grpc

SAMPLE = Sample(id="s", image=png(), turns=[Turn("What is it?", "A box.")])


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(subject: str, key, issuer: tuple | None, *, ca: bool) -> x509.Certificate:  # type: ignore[no-untyped-def,type-arg]
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """A CA, a server certificate for localhost and a client certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    files: dict[str, pathlib.Path] = {}

    def write(name: str, data: bytes) -> None:
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(data)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("align2 test CA", ca_key, None, ca=True)
    write("ca", ca.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        write(
            f"{role}-cert",
            _cert(role, key, (ca, ca_key), ca=False).public_bytes(serialization.Encoding.PEM),
        )
        write(
            f"{role}-key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    return files


def server_with(tiny_llava: pathlib.Path, **security: str) -> ServerThread:
    config = score_config(tiny_llava)
    for key, value in security.items():
        setattr(config.security, key, value)
    return ServerThread(config).start()


@pytest.fixture(scope="module")
def mtls_server(tiny_llava: pathlib.Path, pki: dict[str, pathlib.Path]) -> Iterator[ServerThread]:
    server = server_with(
        tiny_llava,
        tls_cert_file=str(pki["server-cert"]),
        tls_key_file=str(pki["server-key"]),
        tls_client_ca_file=str(pki["ca"]),
    )
    yield server
    server.stop()


def _localhost(server: ServerThread) -> str:
    return f"localhost:{server.app.port}"


def test_mutual_tls_accepts_a_client_certificate(
    mtls_server: ServerThread, pki: dict[str, pathlib.Path]
) -> None:
    with CurationClient(
        _localhost(mtls_server),
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client-key"].read_bytes(),
        certificate_chain=pki["client-cert"].read_bytes(),
        timeout=30,
    ) as client:
        assert client.score([SAMPLE])[0].error is None


def test_mutual_tls_refuses_a_client_without_certificate_and_plaintext(
    mtls_server: ServerThread, pki: dict[str, pathlib.Path]
) -> None:
    with (
        CurationClient(
            _localhost(mtls_server),
            root_certificates=pki["ca"].read_bytes(),
            timeout=5,
            retry=False,
        ) as client,
        pytest.raises(grpc.RpcError) as info,
    ):
        client.score([SAMPLE])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with (
        CurationClient(_localhost(mtls_server), timeout=5, retry=False) as plain,
        pytest.raises(grpc.RpcError) as info,
    ):
        plain.score([SAMPLE])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_only_tls(tiny_llava: pathlib.Path, pki: dict[str, pathlib.Path]) -> None:
    server = server_with(
        tiny_llava, tls_cert_file=str(pki["server-cert"]), tls_key_file=str(pki["server-key"])
    )
    try:
        with CurationClient(
            _localhost(server), root_certificates=pki["ca"].read_bytes(), timeout=30
        ) as client:
            assert client.score([SAMPLE])[0].error is None
    finally:
        server.stop()


def test_the_health_port_answers_plaintext_probes_of_a_tls_server(
    tiny_llava: pathlib.Path, pki: dict[str, pathlib.Path]
) -> None:
    """The kubelet's grpc probes speak plaintext: with TLS on (and tokens) they fail on the
    main port; server.health_port serves health alone in plaintext, the main port's status,
    NOT_SERVING through a drain, and closes with the server. Nothing else answers there."""
    config = score_config(tiny_llava)
    config.security.tls_cert_file = str(pki["server-cert"])
    config.security.tls_key_file = str(pki["server-key"])
    config.server.health_port = 0
    server = ServerThread(config).start()
    health_port = server.app.health_port
    try:
        assert health_port is not None and health_port not in (0, server.app.port)
        target = f"127.0.0.1:{health_port}"
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "align2.v1.CurationService"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:  # health only
                pb_grpc.CurationServiceStub(channel).GetServerInfo(
                    pb.GetServerInfoRequest(), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            server.call(server.app._health.enter_graceful_shutdown())  # as stop() begins
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        main = f"127.0.0.1:{server.app.port}"
        with grpc.insecure_channel(main) as plain, pytest.raises(grpc.RpcError):  # TLS only
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        server.stop()
    closed = f"127.0.0.1:{health_port}"
    with grpc.insecure_channel(closed) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # closed with the server


@pytest.fixture(scope="module")
def token_server(tiny_llava: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("# rotated monthly\nold-token-123\n\nnew-token-456\n")
    server = server_with(tiny_llava, auth_tokens_file=str(tokens))
    yield server
    server.stop()


def test_bearer_token_required_and_checked(token_server: ServerThread) -> None:
    for token in ("old-token-123", "new-token-456"):
        with CurationClient(token_server.target, token=token, timeout=30) as client:
            assert client.score([SAMPLE])[0].error is None
            assert client.server_info().limits.max_samples_per_call == 64
    for token in (None, "wrong", "new-token-45", "new-token-4567"):
        with CurationClient(token_server.target, token=token, retry=False) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.score([SAMPLE])
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details()


def test_a_refused_token_carries_the_error_details_every_align2_error_has(
    token_server: ServerThread,
) -> None:
    """UNAUTHENTICATED with ErrorInfo and the call's x-request-id, on an align2 RPC and on
    reflection (outside the status interceptor). Fails on: a plain abort (no details)."""
    with grpc.insecure_channel(token_server.target) as channel:
        stub = pb_grpc.CurationServiceStub(channel)
        reflect = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        calls = {
            "info": lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30),
            "reflection": lambda: list(
                reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            reason = error_details(info.value)["ErrorInfo"]
            assert isinstance(reason, error_details_pb2.ErrorInfo)
            assert (reason.reason, reason.domain) == ("UNAUTHENTICATED", "align2.v1"), name
            trailers = dict(info.value.trailing_metadata() or ())
            assert name == "reflection" or trailers.get("x-request-id"), name


def test_health_stays_open_for_probes(token_server: ServerThread) -> None:
    with grpc.insecure_channel(token_server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_token_is_checked_before_the_request_bytes(token_server: ServerThread) -> None:
    with grpc.insecure_channel(token_server.target) as channel:
        score = channel.unary_unary(
            "/align2.v1.CurationService/Score", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            score(b"\xff\xff\xff\xff", timeout=30)  # no token, and not a ScoreRequest
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            score(
                b"\xff\xff\xff\xff",
                timeout=30,
                metadata=[("authorization", "Bearer new-token-456")],
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
