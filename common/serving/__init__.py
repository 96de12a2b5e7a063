"""Serving a model: a dynamic batcher (many concurrent requests, one forward pass per group) and an async
load generator that measures a service's throughput and latency percentiles. Week 7 builds its HTTP and gRPC
services on them."""
