"""Generated gRPC stubs (see regen.sh); do not edit the *_pb2*.py files by hand."""
