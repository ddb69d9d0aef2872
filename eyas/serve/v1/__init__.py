"""Generated gRPC code for proto/eyas/v1 (package `eyas.v1`). Regenerate with `python proto/gen.py`."""
