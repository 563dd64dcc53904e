"""The align2 server: gRPC transport, core (batching, scoring), backends, config, metrics."""
