"""Brush RLE: our vectorised codec against label_studio_sdk.converter.brush, same masks, same run.

    python benchmarks/brush_rle.py [--height 1500 --width 2250 --repeat 7]

Masks: object-like shapes (ellipses, a ring, a thin diagonal bar, many small blobs) at the given
size. Both sides take and return what Label Studio's JSON holds (a list of byte values); the SDK
mask is `uint8 * 255` as `mask2rle` expects. Times are the best of `repeat` runs per mask for
the SDK and of 5 x `repeat` for ours (each of ours takes well under a millisecond), in
process CPU time.
The last line is JSON: speedup_vs_sdk = (SDK encode + decode) / (ours), summed over the masks.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from label_studio_sdk.converter import brush as sdk  # noqa: E402

from storage.brush_rle import decode_mask, mask_to_rle  # noqa: E402


def make_masks(h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A few (H, W) bool masks with the run structure of real object masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    ellipse = ((xx - 0.4 * w) / (0.27 * w)) ** 2 + ((yy - 0.47 * h) / (0.3 * h)) ** 2 < 1
    r = np.hypot(xx - 0.8 * w, yy - 0.8 * h)
    ring = (r > 0.05 * h) & (r < 0.13 * h)
    bar = np.abs((yy - xx * h / w)) < 0.02 * h
    blobs = np.zeros((h, w), bool)
    for cy, cx, rad in zip(rng.uniform(0, h, 60), rng.uniform(0, w, 60), rng.uniform(5, 40, 60)):
        blobs |= (yy - cy) ** 2 + (xx - cx) ** 2 < rad**2
    return {"ellipse": ellipse, "ring": ring | ellipse, "bar": bar, "blobs": blobs}


def best_time(fn, repeat: int) -> float:
    """Best of `repeat` calls, in seconds of this process's CPU time: on a shared machine, wall
    time also counts waiting for a core, which hits the SDK's 15-45 ms calls far more often than
    our sub-millisecond ones and would flatter the ratio."""
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--width", type=int, default=2250)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    h, w = args.height, args.width
    totals = {"sdk_encode": 0.0, "sdk_decode": 0.0, "ours_encode": 0.0, "ours_decode": 0.0}
    identical = True
    for name, mask in make_masks(h, w).items():
        as_uint8 = mask.astype(np.uint8) * 255
        rle_sdk = sdk.mask2rle(as_uint8)
        rle_ours = mask_to_rle(mask)
        same_rle = rle_sdk == rle_ours
        same_mask = bool(np.array_equal(decode_mask(rle_sdk, h, w),
                                        sdk.decode_rle(rle_sdk).reshape(h, w, 4)[:, :, 3] > 0))
        identical &= same_rle and same_mask and bool(np.array_equal(decode_mask(rle_ours, h, w), mask))
        # The SDK gets as many tries as it needs to show its best on a shared machine, too.
        t = {
            "sdk_encode": best_time(lambda: sdk.mask2rle(as_uint8), args.repeat),
            "sdk_decode": best_time(lambda: sdk.decode_rle(rle_sdk).reshape(h, w, 4)[:, :, 3],
                                    args.repeat),
            "ours_encode": best_time(lambda: mask_to_rle(mask), args.repeat * 5),
            "ours_decode": best_time(lambda: decode_mask(rle_sdk, h, w), args.repeat * 5),
        }
        for k, v in t.items():
            totals[k] += v
        print(f"{name:8s} {len(rle_sdk):7d} bytes  sdk enc {t['sdk_encode'] * 1e3:7.2f} ms  "
              f"dec {t['sdk_decode'] * 1e3:7.2f} ms | ours enc {t['ours_encode'] * 1e3:6.3f} ms  "
              f"dec {t['ours_decode'] * 1e3:6.3f} ms | identical {same_rle and same_mask}")
    result = {
        "height": h, "width": w, "masks": 4,
        "sdk_encode_ms": round(totals["sdk_encode"] * 1e3 / 4, 3),
        "sdk_decode_ms": round(totals["sdk_decode"] * 1e3 / 4, 3),
        "ours_encode_ms": round(totals["ours_encode"] * 1e3 / 4, 3),
        "ours_decode_ms": round(totals["ours_decode"] * 1e3 / 4, 3),
        "encode_speedup": round(totals["sdk_encode"] / totals["ours_encode"], 1),
        "decode_speedup": round(totals["sdk_decode"] / totals["ours_decode"], 1),
        "speedup_vs_sdk": round((totals["sdk_encode"] + totals["sdk_decode"])
                                / (totals["ours_encode"] + totals["ours_decode"]), 1),
        "bit_identical": bool(identical),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
