"""The gRPC edge: servicers, interceptors, proto <-> domain conversion."""
