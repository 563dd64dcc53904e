"""Server reflection, grpc.reflection.v1 and v1alpha, describing align2.v1 with its comments.

grpcio-reflection serves only v1alpha, while current tools (buf curl, grpcurl's newer
releases) ask for v1. The v1 messages are v1alpha's, field for field, in another package,
so one servicer answers both method paths with the v1alpha message classes.

The generated ``_pb2`` descriptors carry no comments, and the (upb) descriptor pool drops
them from the files it hands out, so the servicer swaps in the files of ``curation.binpb``
(written by ``make protos`` with source info) for the ones the pool answered with.

The google.rpc error types are served too (by symbol and by file name), so that a caller
with nothing but reflection can decode the Status details of an error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from importlib import resources
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
DESCRIPTOR_SET = "curation.binpb"  # next to the stubs, in align2.v1


def contract_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The align2.v1 .proto files with their comments (and their imports, if any)."""
    data = resources.files("align2.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    return list(descriptor_pb2.FileDescriptorSet.FromString(data).file)


def error_detail_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """google.rpc.Status and the error details an error carries (ErrorInfo, BadRequest,
    RetryInfo, ResourceInfo), with their imports first: a caller with only reflection
    (grpcurl, buf curl, a dynamic client) can then decode ``grpc-status-details-bin`` by
    symbol instead of seeing base64."""
    return [_file_proto(m) for m in (any_pb2, duration_pb2, status_pb2, error_details_pb2)]


def _file_proto(module: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


def v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file, its package renamed."""
    proto = _file_proto(reflection_pb2)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."

    def renamed(type_name: str) -> str:
        return new + type_name.removeprefix(old) if type_name.startswith(old) else type_name

    messages = list(proto.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.HasField("type_name"):  # set only where set: scalars have none
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = new.strip(".")
    proto.ClearField("options")
    return proto


class ReflectionServicer(reflection.aio.ReflectionServicer):
    """grpcio-reflection's servicer, answering with the commented file where there is one."""

    def __init__(
        self, service_names: Iterable[str], files: Sequence[descriptor_pb2.FileDescriptorProto]
    ) -> None:
        pool = descriptor_pool.DescriptorPool()
        for proto in files:
            pool.Add(proto)
        super().__init__(service_names, pool=pool)
        self._commented = {
            p.name: p.SerializeToString() for p in files if p.HasField("source_code_info")
        }

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for response in super().ServerReflectionInfo(request_iterator, context):
            found = response.file_descriptor_response.file_descriptor_proto
            for i, data in enumerate(found):
                name = descriptor_pb2.FileDescriptorProto.FromString(data).name
                found[i] = self._commented.get(name, data)
            yield response


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection v1 and v1alpha on ``server``. ListServices names ``service_names``
    (align2.v1 and health) and both reflection services; every file they need is served."""
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    files = [
        _file_proto(health_pb2),
        _file_proto(reflection_pb2),
        v1_reflection_file(),
        *contract_files(),
        *error_detail_files(),
    ]
    unique = list({f.name: f for f in reversed(files)}.values())[::-1]  # first of each name
    servicer = ReflectionServicer(names, unique)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
