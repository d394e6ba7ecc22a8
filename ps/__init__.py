"""ps: a sharded gRPC parameter server for PyTorch with sync, async and bounded-staleness modes."""

__version__ = "0.1.0"
