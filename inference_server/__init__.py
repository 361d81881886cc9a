"""Batched base-policy serving (Ray Serve) with openpi-compatible websocket and gRPC ingresses, and the client
actors use (``inference_server.client.connect_base_policy``). Imports neither reverb, tensorflow nor robosuite:
in production it runs in openpi's own environment on GPU nodes."""
