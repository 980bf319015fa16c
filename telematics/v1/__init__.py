"""Generated protobuf code: regenerate with proto/generate.py."""
