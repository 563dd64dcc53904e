"""The core: scoring, batching, images, templates. Never imports grpc."""
