"""The demo's closing lines: the per-round table (the report's rounds.json: decisions with their intervals, the
general holdout, cost per mask, the automatic stage against ground truth), then where everything is."""
from __future__ import annotations

from engine.demo import format_demo_summary


def test_demo_ends_with_the_per_round_table():
    def row(**kw):
        base = {"holdout": None, "in_use": None, "interval": None, "promoted": None, "general_delta": None,
                "clicks_per_mask": None, "seconds_per_mask": None, "masks_per_image": None,
                "prefill_precision": None, "auto_recall_50": None, "auto_precision_50": None}
        return {**base, **kw}

    flywheel = [
        row(round=0, stage="start", holdout=0.41, in_use=0.41, steps=700, planned_steps=700),
        row(round=1, stage="manual", holdout=0.5875, in_use=0.5875, interval=[0.0534, 0.1428], promoted=True,
            general_delta=-0.004, clicks_per_mask=7.3, seconds_per_mask=14.0, masks_per_image=5.0, steps=350,
            planned_steps=350),
        row(round=2, stage="semi", holdout=0.5909, in_use=0.5875, interval=[-0.011, 0.02], promoted=False,
            clicks_per_mask=4.4, masks_per_image=6.2, prefill_precision=0.91, steps=28, planned_steps=350),
        row(round=3, stage="auto", masks_per_image=7.7, auto_recall_50=0.655, auto_precision_50=0.871),
    ]
    auto = {"round": 3, "masks": 170, "images": 22, "truth": {"recall_50": 0.655, "precision_50": 0.871,
                                                              "truth_masks": 232}}
    result = {
        "minutes": 11.1, "flywheel": flywheel, "auto": auto, "workdir": "w", "config": "c", "store": "s",
        "exports": {"sa1b": "e1", "coco": "e2"}, "export_masks": {"sa1b": 170, "coco": 170}, "report": "r",
        "label_studio": "http://127.0.0.1:8089", "final_checkpoint": "m", "load_average": [1.2, 3.4],
        "holdout": {"images": 12, "masks": 97}}
    text = format_demo_summary(result)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]  # a normal terminal
    flat = " ".join(text.split())

    def cells(n, table=0):
        return [line for line in lines if line.strip().startswith(f"{n} ")][table].split()

    assert cells(0)[:4] == ["0", "start", "700/700", "0.410"]
    assert cells(1) == ["1", "manual", "350/350", "0.588", "[+0.053,", "+0.143]", "-0.004", "yes"]
    assert cells(2)[2] == "28/350*" and cells(2)[-2:] == ["-", "no"]
    assert "not comparable" in text
    assert cells(1, 1) == ["1", "manual", "7.3", "14.0", "5.0", "-", "-", "-"]
    assert cells(2, 1)[2] == "4.4" and cells(2, 1)[-3] == "0.91"
    assert cells(3, 1)[-4:] == ["7.7", "-", "0.66", "0.87"]
    assert "170 masks on 22 images against 232 ground-truth masks: recall@0.5 0.66, precision@0.5 0.87" in flat
    assert "load average 1.2 at the start, 3.4 at the end" in flat and "holdout (12 images, 97 masks)" in flat
    assert '{"rounds"' not in text and "SA-1B export   e1   (170 masks)" in text


def test_a_run_whose_automatic_stage_wrote_nothing_still_prints_its_summary():
    """Issue 30: with no automatic masks precision@0.5 is None; the summary says '-', it does not crash."""
    result = {"minutes": 29.0, "flywheel": [], "workdir": "w", "config": "c", "store": "s",
              "auto": {"masks": 0, "images": 22, "truth": {"recall_50": 0.0, "precision_50": None,
                                                           "truth_masks": 232}},
              "exports": {"sa1b": "e1", "coco": "e2"}, "export_masks": {"sa1b": 0, "coco": 0}, "report": "r",
              "label_studio": "u", "final_checkpoint": "m"}
    text = format_demo_summary(result)
    assert "recall@0.5 0.00, precision@0.5 -" in " ".join(text.split())
