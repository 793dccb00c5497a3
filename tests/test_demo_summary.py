"""The demo's closing lines: the per-round table it describes (decisions with their intervals, the automatic
stage against ground truth), then where everything is."""
from __future__ import annotations

from engine.demo import format_demo_summary


def test_demo_ends_with_the_per_round_table():
    rounds = [
        {"round": 1, "stage": "manual", "summary": {"masks_per_image": 5.0, "clicks_per_mask": 7.3},
         "decision": {"metric": "miou@1", "candidate": 0.5875, "current": 0.568, "promoted": False,
                      "interval": [-0.0034, 0.0428]}},
        {"round": 2, "stage": "semi", "summary": {"masks_per_image": 6.2, "clicks_per_added_mask": 6.6},
         "decision": {"metric": "miou@1", "candidate": 0.5909, "current": 0.568, "promoted": True, "interval": None}},
    ]
    auto = {"round": 3, "masks": 38, "images": 22, "masks_per_image": 1.727,
            "truth": {"recall_50": 0.155, "precision_50": 0.947, "truth_masks": 232}}
    text = format_demo_summary({
        "minutes": 11.1, "rounds": rounds, "auto": auto, "workdir": "w", "config": "c", "store": "s",
        "exports": {"sa1b": "e1", "coco": "e2"}, "export_masks": {"sa1b": 38, "coco": 38}, "report": "r",
        "label_studio": "http://127.0.0.1:8089", "final_checkpoint": "m"})
    lines = text.splitlines()
    row1 = next(line for line in lines if line.strip().startswith("1 "))
    assert "manual" in row1 and "5.0" in row1 and "7.3" in row1 and "0.588 vs 0.568" in row1
    assert "[-0.003, +0.043]" in row1 and row1.endswith("kept")
    row2 = next(line for line in lines if line.strip().startswith("2 "))
    assert "6.6" in row2 and row2.endswith("promoted")
    row3 = next(line for line in lines if line.strip().startswith("3 "))
    assert "38 masks on 22 images" in row3 and "recall@0.5 0.15" in row3 and "232" in row3
    assert '{"rounds"' not in text and "SA-1B export   e1   (38 masks)" in text
