"""The parameter-server side: store, optimizer, consistency policies and the gRPC adapter."""
