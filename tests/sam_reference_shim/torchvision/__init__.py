"""Test-only torchvision shim for Meta's segment-anything (see ../README.md)."""
