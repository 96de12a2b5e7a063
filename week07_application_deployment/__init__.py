"""Week 7: deploying a model. An image classifier behind HTTP (FastAPI) and gRPC with dynamic batching."""
