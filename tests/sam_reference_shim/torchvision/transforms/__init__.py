"""Test-only torchvision.transforms shim (see ../../README.md)."""
