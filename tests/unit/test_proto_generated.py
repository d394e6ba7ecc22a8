"""The committed generated modules are exactly what the .proto produces."""

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


def test_generated_modules_import_inside_the_package():
    from ps.proto import ps_pb2, ps_pb2_grpc

    assert ps_pb2_grpc.ParameterServerStub is not None
    assert ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name == "ps.ParameterServer"
