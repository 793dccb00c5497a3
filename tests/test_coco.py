"""The one COCO reader/writer (storage/coco.py), checked against pycocotools' own COCO API, and the one way from a
mask to a MaskRecord."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from storage.coco import CocoImage, load_ground_truth, read_coco, rle_annotation, segmentation_rle, write_coco
from storage.records import MaskRecord

ROOT = Path(__file__).resolve().parents[1]


def _mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[3:9, 2:12] = True
    m[5:7, 5:8] = False  # a hole
    m[12:15, 1:4] = True  # a second part
    return m


def test_every_segmentation_kind_reads_as_pycocotools_reads_it(tmp_path):
    h, w = 16, 14
    m = _mask(h, w)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    flat = m.flatten(order="F").astype(int)  # uncompressed RLE: run lengths, column-major, starting with 0s
    runs, value, n = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    polygons = [[2, 3, 11.9, 3, 11.9, 8.9, 2, 8.9], [1, 12, 3.9, 12, 3.9, 14.9, 1, 14.9]]
    segs = [{"size": [h, w], "counts": rle["counts"].decode()}, {"size": [h, w], "counts": runs}, polygons]
    doc = {"images": [{"id": 7, "file_name": "a/b.png", "height": h, "width": w}],
           "annotations": [{"id": i + 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": s,
                            "area": 1, "bbox": [0, 0, 1, 1]} for i, s in enumerate(segs)],
           "categories": [{"id": 1, "name": "object"}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    peer = COCO(str(path))
    [image] = read_coco(path)
    assert (image.coco_id, image.file_name, image.height, image.width) == (7, "a/b.png", h, w)
    for ann in image.annotations:
        ours = mask_utils.decode(segmentation_rle(ann["segmentation"], h, w)).astype(bool)
        assert np.array_equal(ours, peer.annToMask(peer.anns[ann["id"]]).astype(bool)), ann["id"]
    assert np.array_equal(load_ground_truth(path)["a/b.png"][1].mask, m)  # uncompressed RLE: exactly the mask


def test_written_coco_loads_in_pycocotools_and_reads_back(tmp_path):
    m = _mask(16, 14)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    counts = write_coco(tmp_path / "x" / "annotations.json",
                        [CocoImage(1, "one.png", 16, 14, [rle_annotation(1, 1, rle, parent_id=None)])])
    assert counts == {"images": 1, "masks": 1}
    peer = COCO(str(tmp_path / "x" / "annotations.json"))
    assert np.array_equal(peer.annToMask(peer.anns[1]).astype(bool), m)
    assert peer.anns[1]["area"] == int(m.sum()) and peer.anns[1]["bbox"] == [1.0, 3.0, 11.0, 12.0]
    [gt] = load_ground_truth(tmp_path / "x" / "annotations.json", image_ids=["one.png"])["one.png"]
    assert np.array_equal(gt.mask, m) and gt.parent_id is None


def test_a_file_that_is_not_coco_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [{"file_name": "a.png"}]}')
    try:
        read_coco(tmp_path / "bad.json")
    except ValueError as e:
        assert str(e).startswith(str(tmp_path / "bad.json")) and "\n" not in str(e)
    else:
        raise AssertionError("no error")


def test_a_record_from_a_mask_takes_size_area_and_box_from_its_rle():
    m = _mask(16, 14)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rec = MaskRecord.from_rle("a.png", "id1", rle, "manual", 2, verified=True)
    assert (rec.height, rec.width, rec.area) == (16, 14, int(mask_utils.area(rle)))
    assert rec.bbox == [float(v) for v in mask_utils.toBbox(rle)] and rec.verified and rec.round == 2


def test_nothing_else_parses_coco_or_builds_mask_records_by_hand():
    """One COCO reader (storage/coco.py) and one record constructor (MaskRecord.from_rle): nothing in the engine,
    the stages or the model opens a COCO file itself or fills a record's size, area and box by hand. (Reading an
    export back, storage/exports/rows.py, keeps the exported figures as they were written.)"""
    coco_parse = re.compile(r"json\.loads?\(.*(annotations|coco|truth)", re.I)
    by_hand = re.compile(r"\bMaskRecord\(")
    found = []
    for pkg in ("engine", "stages", "model", "storage"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if rel in ("storage/coco.py", "storage/records.py", "storage/exports/rows.py"):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if coco_parse.search(line) or by_hand.search(line):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert found == []
