"""The worker side: PSClient (pull/push over gRPC) and the training loop."""
