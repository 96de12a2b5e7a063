"""Week 7 assignment: a classifier as a service (HTTP, gRPC, metrics, dynamic batching) to a contract."""
