"""The committed generated modules are exactly what the .proto produces, and every RPC of the
service is wired: generated stub and servicer, the server's handler and ps.wire's stub."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("ps_pb2.py", "ps_pb2.pyi", "ps_pb2_grpc.py")


def test_committed_generated_code_matches_the_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}", str(ROOT / "proto" / "ps" / "proto" / "ps.proto"),
    ])
    assert rc == 0
    for name in GENERATED:
        fresh = (tmp_path / "ps" / "proto" / name).read_text()
        committed = (ROOT / "ps" / "proto" / name).read_text()
        assert fresh == committed, f"ps/proto/{name} is stale: regenerate it (see proto/ps/proto/ps.proto)"


class _Recorder:
    """Stands in for a channel and a server: records what the generated code registers."""

    def __init__(self):
        self.methods, self.handlers = {}, {}

    def unary_unary(self, path, request_serializer=None, response_deserializer=None, **_):
        self.methods[path] = (request_serializer, response_deserializer)
        return path

    def stream_stream(self, path, request_serializer=None, response_deserializer=None, **_):
        self.methods[path] = (request_serializer, response_deserializer)
        return path

    def add_generic_rpc_handlers(self, handlers):
        self.generic = handlers

    def add_registered_method_handlers(self, service, handlers):
        self.handlers[service] = handlers


def _service():
    from ps.proto import ps_pb2

    service = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
    return service, [(m.name, getattr(ps_pb2, m.input_type.name), getattr(ps_pb2, m.output_type.name))
                     for m in service.methods]


def test_every_rpc_of_the_service_has_a_stub_and_a_servicer_method_with_its_own_message_types():
    from ps.proto import ps_pb2_grpc  # imports inside the package (ps.proto.ps_pb2, not a top-level ps_pb2)

    service, methods = _service()
    assert service.full_name == "ps.ParameterServer" and methods
    channel, server = _Recorder(), _Recorder()
    ps_pb2_grpc.ParameterServerStub(channel)
    ps_pb2_grpc.add_ParameterServerServicer_to_server(ps_pb2_grpc.ParameterServerServicer(), server)
    handlers = server.handlers["ps.ParameterServer"]
    assert set(channel.methods) == {f"/ps.ParameterServer/{name}" for name, _, _ in methods}
    assert set(handlers) == {name for name, _, _ in methods}
    for name, request, response in methods:
        serialize, deserialize = channel.methods[f"/ps.ParameterServer/{name}"]
        assert (serialize, deserialize) == (request.SerializeToString, response.FromString), name
        h = handlers[name]
        assert (h.request_deserializer, h.response_serializer) == (request.FromString, response.SerializeToString)
        assert h.unary_unary is not None, f"{name} must be unary-unary"


def test_the_servers_handler_and_the_wire_stub_serve_every_rpc_of_the_service():
    import grpc

    from ps import wire
    from ps.server.servicer import ParameterServerServicer

    _, methods = _service()
    servicer = ParameterServerServicer.__new__(ParameterServerServicer)  # its methods, not a shard
    handler = wire.handler(servicer)
    channel = _Recorder()
    wire.Stub(channel)
    for name, request, response in methods:
        path = f"/ps.ParameterServer/{name}"
        details = type("Details", (grpc.HandlerCallDetails,), {"method": path, "invocation_metadata": ()})()
        served = handler.service(details)
        assert served is not None and served.unary_unary is not None, f"{name} is not served"
        assert served.unary_unary.__func__ is getattr(ParameterServerServicer, name)  # its own method
        # Requests the generated stub writes are read by the server's deserializer.
        read = served.request_deserializer(request().SerializeToString())
        assert not isinstance(read, wire.Malformed), (name, read)
        assert path in channel.methods, f"wire.Stub lacks {name}"
    # Beside them, the stream path: raw bytes both ways, served by the servicer's Stream.
    details = type("Details", (grpc.HandlerCallDetails,), {"method": "/ps.ParameterServer/Stream",
                                                          "invocation_metadata": ()})()
    served = handler.service(details)
    assert served.stream_stream.__func__ is ParameterServerServicer.Stream
    assert served.request_deserializer is None and served.response_serializer is None
    assert channel.methods["/ps.ParameterServer/Stream"] == (None, None)
