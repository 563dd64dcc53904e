"""Generated files are fresh: the align2.v1 stubs (`make protos`) and the configuration
doc (`make docs`)."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The generators' own version stamps: they say which grpcio-tools / protoc wrote a file, not
# what the .proto says, so a new tools release alone must not make the stubs "stale". What
# they demand of the runtime is checked against pyproject's floors below instead.
_STAMPS = [
    (re.compile(rb"^# Protobuf Python Version: .*$", re.M), b"# Protobuf Python Version: *"),
    (
        re.compile(
            rb"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)"
            rb"\s*\d+,\s*\d+,\s*\d+,"
        ),
        rb"\1 *,",
    ),
    (re.compile(rb"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), b"GRPC_GENERATED_VERSION = *"),
]


def _without_stamps(content: bytes) -> bytes:
    for pattern, replacement in _STAMPS:
        content = pattern.sub(replacement, content)
    return content


def test_checked_in_stubs_are_fresh(tmp_path: pathlib.Path) -> None:
    fresh = _generator().generate(tmp_path)
    checked_in = ROOT / "client" / "align2" / "v1"
    names = sorted(p.name for p in fresh)
    assert names == sorted(p.name for p in checked_in.iterdir() if p.is_file()), (
        "stub files differ from a fresh generation: run `make protos`"
    )
    for path in fresh:
        assert _without_stamps(path.read_bytes()) == _without_stamps(
            (checked_in / path.name).read_bytes()
        ), f"{path.name} is stale: run `make protos` and commit the result"


def test_a_tools_release_alone_does_not_make_stubs_stale() -> None:
    stub = (ROOT / "client" / "align2" / "v1" / "curation_pb2_grpc.py").read_bytes()
    bumped = stub.replace(b"GRPC_GENERATED_VERSION = '", b"GRPC_GENERATED_VERSION = '9")
    assert bumped != stub and _without_stamps(bumped) == _without_stamps(stub)
    edited = stub.replace(b"/align2.v1.CurationService/Score", b"/align2.v1.CurationService/X")
    assert _without_stamps(edited) != _without_stamps(stub)  # a real change still shows
    # protoc's two stamps in the messages module: the header and the runtime check.
    messages = (ROOT / "client" / "align2" / "v1" / "curation_pb2.py").read_bytes()
    bumped, headers = re.subn(rb"(# Protobuf Python Version: )\d+", rb"\g<1>99", messages)
    bumped, checks = re.subn(rb"(Domain\.PUBLIC,\s*)\d+,\s*\d+", rb"\g<1>99, 0", bumped)
    assert (headers, checks) == (1, 1)
    assert _without_stamps(bumped) == _without_stamps(messages)


def _floor(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9.]+)", requirement)
    assert match, f"{requirement}: no >= floor"
    return tuple(int(x) for x in match.group(1).split("."))


def test_the_light_clients_floors_satisfy_what_the_stubs_demand() -> None:
    """Generated stubs refuse a runtime older than their generator: a user who installs the
    light client at pyproject's lowest allowed versions must still be able to import them."""
    stubs = ROOT / "client" / "align2" / "v1"
    grpc_stamp = re.search(
        r"GRPC_GENERATED_VERSION = '([0-9.]+)'", (stubs / "curation_pb2_grpc.py").read_text()
    )
    pb_stamp = re.search(
        r"# Protobuf Python Version: ([0-9.]+)", (stubs / "curation_pb2.py").read_text()
    )
    assert grpc_stamp and pb_stamp
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {re.split(r"[<>=!~ ]", d)[0]: _floor(d) for d in dependencies}
    generated = tuple(int(x) for x in grpc_stamp.group(1).split("."))
    assert floors["grpcio"] >= generated, f"raise pyproject's grpcio floor to {grpc_stamp[1]}"
    generated = tuple(int(x) for x in pb_stamp.group(1).split("."))
    assert floors["protobuf"] >= generated, f"raise pyproject's protobuf floor to {pb_stamp[1]}"


def test_configuration_doc_is_fresh() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", ROOT / "scripts" / "gen_config_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "configuration.md").read_text() == module.render(), (
        "docs/configuration.md is stale: run `make docs`"
    )
