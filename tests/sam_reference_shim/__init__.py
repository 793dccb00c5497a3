"""Import Meta's `segment_anything` with the test-only torchvision shim, without leaking the shim.

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


def import_segment_anything() -> ModuleType:
    """Return the `segment_anything` package (Meta's reference implementation)."""
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    importlib.import_module("transformers.models.sam.modeling_sam")  # fixes transformers' torchvision check first
    sys.path.insert(0, _SHIM_DIR)
    try:
        sam = importlib.import_module("segment_anything")
        importlib.import_module("segment_anything.automatic_mask_generator")
    finally:
        sys.path.remove(_SHIM_DIR)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    return sam
