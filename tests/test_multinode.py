"""More than one Ray node, and a node that dies: the automatic stage on a head and a worker node on this machine
(`ray.cluster_utils.Cluster`, tests/multinode_stage.py in a process of its own), the worker node killed after
the first commits. The stage completes on what remains: every image done exactly once, no mask twice, and the
same masks as the same stage without the kill. Ray's own settings that make it so are documented in
docs/scaling.md (Ray Data restarts a pool's actors without limit and retries their tasks; our commit rule drops
a part whose images are done already, and `gc` removes parts nobody committed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "multinode_stage.py"


def _run(work: Path, *flags: str) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), str(work), *flags], capture_output=True, text=True,
                         timeout=600, cwd=SCRIPT.parents[1])
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return json.loads((work / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.ray
def test_the_automatic_stage_completes_when_a_worker_node_dies_mid_stage(tmp_path):
    calm = _run(tmp_path / "calm")
    killed = _run(tmp_path / "killed", "--kill")
    assert 4 <= killed["killed_after_images"] < 16 and killed["nodes_alive"] == 1
    for run in (calm, killed):
        assert run["images"] == run["index_rows"] == run["distinct_images"] == 16  # every image, once
        assert run["mask_rows"] == run["distinct_masks"] == run["masks"]  # no mask twice
    assert killed["mask_ids"] == calm["mask_ids"]  # what the dead node made and lost is made again, once
    assert killed["staged_after_gc"] == 0
