"""Generated gRPC stubs for chunk.proto (see the comment at the top of each *_pb2 file)."""
