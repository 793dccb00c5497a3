"""Test-only stand-in for the three timm helpers segment-anything-hq imports (its TinyViT module); the real timm
imports torchvision, which has no CPU build here. See ../README.md."""
