"""Import Meta's reference packages (`segment_anything`, `sam2`, `segment_anything_hq`) with the test-only torchvision shim, without leaking the shim.

transformers decides once per process whether torchvision is installed; if it saw this shim it
would try to use real torchvision features. So transformers' SAM code is imported first, the shim
is put on sys.path only while `segment_anything` is imported, and then taken off again.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

_SHIM_DIR = str(Path(__file__).resolve().parent)


# package -> the submodules that import torchvision / timm (imported while the shim is on the path)
_REFERENCES = {
    "segment_anything": ["segment_anything.automatic_mask_generator"],
    "sam2": ["sam2.build_sam", "sam2.sam2_image_predictor", "sam2.automatic_mask_generator"],
    "segment_anything_hq": ["segment_anything_hq.automatic_mask_generator"],
}


def import_reference(package: str) -> ModuleType:
    """Return one of Meta's reference packages (`segment_anything`, `sam2`, `segment_anything_hq`), imported
    with the test-only torchvision / timm stand-ins, which are then taken off `sys.modules` again."""
    if package in sys.modules:
        return sys.modules[package]
    importlib.import_module("transformers.models.sam.modeling_sam")  # fixes transformers' torchvision check first
    sys.path.insert(0, _SHIM_DIR)
    try:
        mod = importlib.import_module(package)
        for sub in _REFERENCES[package]:
            importlib.import_module(sub)
    finally:
        sys.path.remove(_SHIM_DIR)
        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[name]
    return mod


def import_segment_anything() -> ModuleType:
    """Return the `segment_anything` package (Meta's reference implementation)."""
    return import_reference("segment_anything")
