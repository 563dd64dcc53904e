"""Channel options, the retry service config, TLS credentials and the token metadata."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import grpc
import pytest

from align2.client.channel import (
    RETRIED_METHODS,
    SERVICE,
    ClientArgs,
    ClientOptions,
    RetryPolicy,
    call_metadata,
    channel_credentials,
    channel_options,
)


def test_retry_service_config() -> None:
    config = json.loads(RetryPolicy().service_config())
    [method_config] = config["methodConfig"]
    assert method_config["name"] == [{"service": SERVICE, "method": m} for m in RETRIED_METHODS]
    assert "Curate" not in RETRIED_METHODS
    assert method_config["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.200s",
        "maxBackoff": "10.000s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }


def test_retry_throttling_is_in_the_service_config() -> None:
    config = json.loads(RetryPolicy().service_config())
    assert config["retryThrottling"] == {"maxTokens": 1000, "tokenRatio": 2.0}
    custom = RetryPolicy(throttle_max_tokens=10, throttle_token_ratio=0.1234)
    assert json.loads(custom.service_config())["retryThrottling"] == {
        "maxTokens": 10,
        "tokenRatio": 0.123,  # gRPC reads 3 decimals
    }
    assert "retryThrottling" not in json.loads(RetryPolicy(throttle_max_tokens=0).service_config())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"throttle_max_tokens": 1001}, "throttle_max_tokens"),
        ({"throttle_max_tokens": -1}, "throttle_max_tokens"),
        ({"throttle_token_ratio": 0.0001}, "throttle_token_ratio"),
        ({"max_attempts": 1}, "max_attempts"),
        ({"max_attempts": 6}, "max_attempts"),
        ({"initial_backoff_seconds": 0.001}, "at least"),
        ({"backoff_multiplier": 0}, "backoff_multiplier"),
        ({"codes": ("UNAVAILABLE", "SOMETIMES")}, "SOMETIMES"),
    ],
)
def test_retry_policy_validates(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


def test_default_options() -> None:
    options = dict(channel_options())
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.max_send_message_length"] == 64 * 1024 * 1024
    # A response may be larger than its request (Align: each text and its rewrite).
    assert options["grpc.max_receive_message_length"] == -1
    assert options["grpc.keepalive_time_ms"] >= 300_000
    assert options["grpc.max_reconnect_backoff_ms"] == 10_000  # gRPC's own: 120 s
    assert json.loads(options["grpc.service_config"])["methodConfig"]


def test_options_without_retry_and_with_overrides() -> None:
    options = dict(
        channel_options(
            {"grpc.keepalive_time_ms": 60_000, "grpc.lb_policy_name": "round_robin"},
            retry=False,
            max_message_bytes=1024,
        )
    )
    assert options["grpc.enable_retries"] == 0
    assert "grpc.service_config" not in options
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.lb_policy_name"] == "round_robin"
    assert options["grpc.max_send_message_length"] == 1024
    assert options["grpc.max_receive_message_length"] == -1


def test_custom_policy_is_used() -> None:
    options = dict(channel_options(retry=RetryPolicy(max_attempts=2, codes=("UNAVAILABLE",))))
    policy = json.loads(options["grpc.service_config"])["methodConfig"][0]["retryPolicy"]
    assert (policy["maxAttempts"], policy["retryableStatusCodes"]) == (2, ["UNAVAILABLE"])


def test_call_metadata() -> None:
    assert call_metadata("abc") == (("authorization", "Bearer abc"),)
    assert call_metadata(None) == ()
    assert call_metadata("") == ()


def test_plaintext_without_certificates() -> None:
    assert channel_credentials() is None


def test_tls_reads_pem_files_and_takes_bytes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_ssl(**kwargs: Any) -> str:
        seen.update(kwargs)
        return "credentials"

    monkeypatch.setattr(grpc, "ssl_channel_credentials", fake_ssl)
    (tmp_path / "ca.pem").write_bytes(b"CA")
    result = channel_credentials(
        root_certificates=tmp_path / "ca.pem", private_key=b"KEY", certificate_chain=b"CHAIN"
    )
    assert result == "credentials"
    assert seen == {
        "root_certificates": b"CA",
        "private_key": b"KEY",
        "certificate_chain": b"CHAIN",
    }


def test_tls_with_system_roots() -> None:
    assert isinstance(channel_credentials(tls=True), grpc.ChannelCredentials)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"private_key": b"k"}, "both private_key and certificate_chain"),
        ({"certificate_chain": b"c"}, "both private_key and certificate_chain"),
        ({"root_certificates": b"ca", "tls": False}, "tls=False"),
    ],
)
def test_credentials_validate(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        channel_credentials(**kwargs)


def test_the_typed_keyword_arguments_are_the_options_fields() -> None:
    # ClientArgs types the clients' **options for type checkers; it must not drift from
    # the dataclass (annotations are compared as written: the module defers them).
    fields = {f.name: f.type for f in dataclasses.fields(ClientOptions)}
    assert fields.pop("target") == "str"
    written = {k: getattr(v, "__forward_arg__", v) for k, v in ClientArgs.__annotations__.items()}
    assert written == fields


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"timeout": 0}, "timeout"),
        ({"certificate_chain": b"c"}, "mTLS"),
        ({"root_certificates": b"ca", "tls": False}, "tls=False"),
    ],
)
def test_options_are_checked_when_built(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientOptions("127.0.0.1:1", **kwargs)


def test_options_keep_secrets_out_of_their_repr() -> None:
    options = ClientOptions("h:1", token="s3cret", private_key=b"KEY", certificate_chain=b"C")
    assert "s3cret" not in repr(options) and "KEY" not in repr(options)
