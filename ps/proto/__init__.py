"""Generated gRPC and protobuf modules for the ps wire protocol (see proto/ps/proto/ps.proto)."""
