"""Server reflection alone (an in-process server with nothing else on it): v1 and v1alpha
answer alike, every listed service resolves, and align2.v1 is served with its comments."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from align2.server.transport import reflection

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse
FileProto = descriptor_pb2.FileDescriptorProto
CONTRACT = "align2.v1.CurationService"
LISTED = {
    CONTRACT,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}
VERSIONS = ("v1", "v1alpha")
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    reflection.enable(server, [CONTRACT, "grpc.health.v1.Health"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)


async def ask(channel: grpc.aio.Channel, version: str, request: Request) -> Response:
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    replies = [reply async for reply in call(iter([request]), timeout=10)]
    assert len(replies) == 1
    return replies[0]


def files_of(reply: Response) -> dict[str, FileProto]:
    assert not reply.HasField("error_response"), reply.error_response
    protos = reply.file_descriptor_response.file_descriptor_proto
    return {p.name: p for p in map(FileProto.FromString, protos)}


def leading_comment(file: FileProto, *path: int) -> str:
    found = [loc for loc in file.source_code_info.location if tuple(loc.path) == path]
    return found[0].leading_comments if found else ""


@pytest.mark.parametrize("version", VERSIONS)
async def test_both_versions_list_the_contract_health_and_themselves(
    channel: grpc.aio.Channel, version: str
) -> None:
    reply = await ask(channel, version, Request(list_services=""))
    assert {s.name for s in reply.list_services_response.service} == LISTED


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("service", sorted(LISTED))
async def test_every_listed_service_resolves_to_the_file_defining_it(
    channel: grpc.aio.Channel, version: str, service: str
) -> None:
    files = files_of(await ask(channel, version, Request(file_containing_symbol=service)))
    package, name = service.rsplit(".", 1)
    assert any(f.package == package and name in {s.name for s in f.service} for f in files.values())


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_contract_is_served_with_its_comments(
    channel: grpc.aio.Channel, version: str
) -> None:
    files = files_of(
        await ask(channel, version, Request(file_containing_symbol="align2.v1.Sample"))
    )
    contract = files["align2/v1/curation.proto"]
    service = contract.service[0]
    assert service.name == "CurationService" and service.method[0].name == "Score"
    # Paths: FileDescriptorProto.service[0].method[0] and FileDescriptorProto.message_type[i].
    score = (
        FileProto.SERVICE_FIELD_NUMBER,
        0,
        descriptor_pb2.ServiceDescriptorProto.METHOD_FIELD_NUMBER,
        0,
    )
    assert "Reward-model scores" in leading_comment(contract, *score)
    sample = [m.name for m in contract.message_type].index("Sample")
    assert "One LLaVA record" in leading_comment(
        contract, FileProto.MESSAGE_TYPE_FIELD_NUMBER, sample
    )
    by_name = await ask(channel, version, Request(file_by_filename="align2/v1/curation.proto"))
    assert files_of(by_name)["align2/v1/curation.proto"] == contract


async def test_v1_messages_are_v1alpha_messages_renamed(channel: grpc.aio.Channel) -> None:
    """What lets one servicer answer both: same messages, fields, numbers and types."""
    reply = await ask(channel, "v1", Request(file_containing_symbol=reflection.V1_SERVICE_NAME))
    v1 = files_of(reply)["grpc/reflection/v1/reflection.proto"]
    v1alpha = FileProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1alpha)
    assert v1.package == "grpc.reflection.v1"
    assert str(v1.message_type).replace(".v1.", ".v1alpha.") == str(v1alpha.message_type)
    assert str(v1.service).replace(".v1.", ".v1alpha.") == str(v1alpha.service)


@pytest.mark.parametrize("version", VERSIONS)
async def test_an_unknown_symbol_is_not_found(channel: grpc.aio.Channel, version: str) -> None:
    reply = await ask(channel, version, Request(file_containing_symbol="align2.v1.Nope"))
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
