"""The round loop and its ledger: the SA-1B plan, gated promotion, and resume after a crash, Ctrl-C or SIGKILL.

The loop runs here with cheap real step functions (they write small files and keep a trace of every call);
the real stages are exercised by their own tests and by the end-to-end demo.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from engine.integrations.config import EngineConfig, check_config, load_config
from engine.rounds import (
    LEDGER_FILE,
    Ledger,
    LedgerError,
    StepFailed,
    Steps,
    WorkdirLock,
    promotion_decision,
    run_rounds,
    select_images,
)

REPO = Path(__file__).resolve().parents[1]

# Holdout 1-click mIoU each round's retraining adds to its starting model: round 2 regresses (so it must be
# kept out), round 3 improves on round 1's model.
GAIN = {0: 0.2, 1: 0.15, 2: -0.05, 3: 0.1}


# --- cheap real step functions ------------------------------------------------------------------

def _trace(cfg: EngineConfig, *event) -> None:
    """Append one line per call (fsync'd, so a SIGKILL right after still leaves it)."""
    with open(Path(cfg.workdir) / "trace.log", "a") as f:
        f.write(json.dumps(event) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _hang_if_asked(cfg: EngineConfig, what: str) -> None:
    """Block once at step `what` when SA_TEST_HANG_AT names it (the parent kills us there)."""
    if os.environ.get("SA_TEST_HANG_AT") != what:
        return
    marker = Path(cfg.workdir) / f"hung-{what}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    time.sleep(120)


def _fail_once_if_asked(cfg: EngineConfig, what: str) -> None:
    if os.environ.get("SA_TEST_FAIL_AT") != what:
        return
    marker = Path(cfg.workdir) / f"failed-{what}"
    if not marker.exists():
        marker.write_text("1")
        raise OSError(f"{what}: disk full (test)")


def _write_model(out_dir: str, quality: float, parent: str | None) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "model.json").write_text(json.dumps({"quality": quality, "parent": parent}))


def _quality(checkpoint: str) -> float:
    return json.loads((Path(checkpoint) / "model.json").read_text())["quality"]


def list_images(cfg):
    _trace(cfg, "list")
    return sorted(p.stem for p in Path(cfg.path(cfg.images.source)).iterdir())


def init_model(cfg, out_dir):
    _trace(cfg, "init", out_dir)
    _write_model(out_dir, 0.1, None)
    return {"checkpoint": out_dir, "source": "fresh"}


def bootstrap(cfg, checkpoint, out_dir):
    _trace(cfg, "bootstrap", checkpoint, out_dir)
    _write_model(out_dir, _quality(checkpoint) + GAIN[0], checkpoint)
    return {"checkpoint": out_dir, "metrics": {"loss": 1.0}, "steps": cfg.model.bootstrap_steps}


def _stage(name):
    def run(cfg, round, checkpoint, image_ids):
        _trace(cfg, name, round, checkpoint, image_ids)
        _hang_if_asked(cfg, f"{name}:{round}")
        _fail_once_if_asked(cfg, f"{name}:{round}")
        q = _quality(checkpoint)
        masks = {i: 10 + round * 5 for i in image_ids}
        out = Path(cfg.workdir) / "masks" / f"{name}-r{round}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(masks))
        return {"images": len(image_ids), "masks": sum(masks.values()),
                "masks_per_image": sum(masks.values()) / len(image_ids),
                "clicks_per_mask": round_clicks(q), "seconds_per_mask": 3 + 1.5 * round_clicks(q)}
    return run


def round_clicks(quality: float) -> float:
    return round(10 * (1 - quality), 3)


def train(cfg, init_checkpoint, out_dir, round):
    _trace(cfg, "train", round, init_checkpoint, out_dir)
    _hang_if_asked(cfg, f"train:{round}")
    _write_model(out_dir, _quality(init_checkpoint) + GAIN[round], init_checkpoint)
    return {"checkpoint": out_dir, "metrics": {"loss": 1.0 / round}, "minutes": 0.01}


def evaluate(cfg, checkpoint):
    _trace(cfg, "eval", checkpoint)
    q = _quality(checkpoint)
    return {"miou@1": q, "miou@3": q + 0.1, "miou@5": q + 0.15, "box_miou": q + 0.2}


CHEAP = Steps(list_images=list_images, init_model=init_model, bootstrap=bootstrap, manual=_stage("manual"),
              semi=_stage("semi"), auto=_stage("auto"), train=train, evaluate=evaluate)


def _config(tmp_path: Path, **extra) -> Path:
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(20):
        (images / f"img-{i:03d}.png").write_bytes(b"")
    data = {"workdir": str(tmp_path / "run"), "images": {"source": str(images)},
            "stages": {"manual": {"rounds": 2, "images_per_round": 4}, "semi": {"rounds": 1, "images_per_round": 5}}}
    for key, value in extra.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    p = tmp_path / "engine.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _trace_lines(cfg: EngineConfig) -> list[list]:
    p = Path(cfg.workdir) / "trace.log"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _child(config_path: str) -> None:
    """Subprocess entry: run the loop with the cheap steps (signals and kills come from the parent)."""
    # A foreground terminal's Ctrl-C: when the suite itself runs in the background (`cmd &` in a
    # script), the shell starts it with SIGINT ignored and Python then keeps it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_rounds(load_config(config_path), CHEAP)


def _spawn(config_path: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"from tests.test_rounds import _child; _child({str(config_path)!r})"],
                            cwd=REPO, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {path.name}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


# --- the plan --------------------------------------------------------------------------------------

def test_rounds_follow_the_sa1b_plan_and_promotion_is_gated(tmp_path):
    cfg = load_config(_config(tmp_path))
    summary = run_rounds(cfg, CHEAP)
    ledger = Ledger(Path(cfg.workdir) / LEDGER_FILE)
    assert [e["step"] for e in ledger.entries()] == [
        "r0.init", "r0.eval",
        "r1.select", "r1.manual", "r1.train", "r1.eval", "r1.promote",
        "r2.select", "r2.manual", "r2.train", "r2.eval", "r2.promote",
        "r3.select", "r3.semi", "r3.train", "r3.eval", "r3.promote",
        "r4.select", "r4.auto"]
    assert all(e["status"] == "done" and e["attempts"] == 1 and e["seconds"] >= 0 for e in ledger.entries())

    models = Path(cfg.workdir).resolve() / "models"
    r1, r2, r3 = (ledger.get(f"r{r}.promote")["outputs"] for r in (1, 2, 3))
    assert r1["promoted"] and r1["checkpoint"] == str(models / "r1")
    # round 2's model is worse on the holdout: kept out, and the ledger says why
    assert not r2["promoted"] and r2["checkpoint"] == str(models / "r1")
    assert r2["reason"].startswith("kept current model: candidate miou@1 0.2000 vs current 0.2500 is not better")
    # round 3 trains from round 1's model (the promoted one), not from round 2's
    assert ledger.get("r3.train")["inputs"]["init_checkpoint"] == str(models / "r1")
    assert ledger.get("r3.semi")["inputs"]["checkpoint"] == str(models / "r1")
    assert r3["promoted"] and summary["final_checkpoint"] == str(models / "r3")
    assert ledger.get("r4.auto")["inputs"]["checkpoint"] == str(models / "r3")

    # disjoint selections; the automatic stage takes the rest
    picked = [ledger.get(f"r{r}.select")["outputs"]["image_ids"] for r in (1, 2, 3, 4)]
    assert [len(p) for p in picked] == [4, 4, 5, 7]
    assert len(set().union(*picked)) == 20
    assert [r["decision"]["promoted"] for r in summary["rounds"]] == [True, False, True]


def test_a_holdout_carved_from_the_users_images_gates_promotion_and_is_never_selected(tmp_path):
    """images.holdout_from_source: N images are chosen first and drawn (here: a cheap step standing in for the
    people's project), the evaluation reads the folder the step wrote, and no round ever selects them."""
    def holdout(cfg, checkpoint, image_ids):
        _trace(cfg, "holdout", checkpoint, image_ids)
        folder = Path(cfg.workdir) / "holdout"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "annotations.json").write_text("{}")
        return {"source": str(folder / "images"), "ground_truth": str(folder / "annotations.json"),
                "images": len(image_ids), "masks": 3 * len(image_ids)}

    seen = []

    def evaluate_here(cfg, checkpoint):
        seen.append((cfg.images.holdout_source, cfg.images.holdout_ground_truth))
        return evaluate(cfg, checkpoint)

    cfg = load_config(_config(tmp_path, **{"images.holdout_from_source": 3, "images.holdout_source": None,
                                           "images.holdout_ground_truth": None}))
    assert not [p for p in check_config(cfg, network=False) if p.startswith("images.holdout")]  # no COCO holdout
    steps = Steps(**{**CHEAP.__dict__, "holdout": holdout, "evaluate": evaluate_here})
    run_rounds(cfg, steps)
    trace = _trace_lines(cfg)
    [held] = [e[2] for e in trace if e[0] == "holdout"]
    assert len(held) == 3 and [e[0] for e in trace].index("holdout") < [e[0] for e in trace].index("eval")
    selected = [i for e in trace if e[0] in ("manual", "semi", "auto") for i in e[3]]
    assert selected and not set(held) & set(selected)  # never annotated in a round, never trained on
    folder = str(Path(cfg.workdir) / "holdout")
    assert seen and all(src == f"{folder}/images" and gt == f"{folder}/annotations.json" for src, gt in seen)
    assert [e["step"] for e in Ledger(Path(cfg.workdir) / LEDGER_FILE).entries()][:3] == [
        "r0.init", "r0.holdout", "r0.eval"]


def test_a_review_follows_each_semi_round_when_enabled(tmp_path):
    def review(cfg, round, checkpoint):
        _trace(cfg, "review", round, checkpoint)
        return {"round": round, "queued": 2, "accepted": 1, "fixed": 0, "rejected": 1}

    cfg = load_config(_config(tmp_path, **{"stages.review.enabled": True}))
    run_rounds(cfg, Steps(**{**CHEAP.__dict__, "review": review}))
    steps = [e["step"] for e in Ledger(Path(cfg.workdir) / LEDGER_FILE).entries()]
    assert steps[steps.index("r3.semi") + 1] == "r3.review" and steps[steps.index("r3.review") + 1] == "r3.train"
    assert "r1.review" not in steps  # manual rounds' masks are drawn by people: nothing to doubt


def test_final_auto_over_all_images_and_bootstrap_round(tmp_path):
    cfg = load_config(_config(tmp_path, **{"stages.final_auto": "all", "model.bootstrap_steps": 10}))
    run_rounds(cfg, CHEAP)
    ledger = Ledger(Path(cfg.workdir) / LEDGER_FILE)
    steps = [e["step"] for e in ledger.entries()]
    # forgetting is measured by default: a general holdout carved from the starting (bootstrap) set
    assert steps[:4] == ["r0.init", "r0.bootstrap", "r0.general", "r0.eval"]
    # the baseline is the bootstrapped model, so round 1 must beat it
    assert ledger.get("r0.eval")["inputs"]["checkpoint"].endswith("r0-bootstrap")
    assert ledger.get("r0.eval")["outputs"]["miou@1"] == pytest.approx(0.3)
    assert len(ledger.get("r4.select")["outputs"]["image_ids"]) == 20


def test_no_rounds_runs_only_the_automatic_stage(tmp_path):
    cfg = load_config(_config(tmp_path, **{"stages.manual.rounds": 0, "stages.semi.rounds": 0}))
    run_rounds(cfg, CHEAP)
    assert [e["step"] for e in Ledger(Path(cfg.workdir) / LEDGER_FILE).entries()] == [
        "r0.init", "r1.select", "r1.auto"]


def test_rounds_without_images_left_are_skipped(tmp_path):
    cfg = load_config(_config(tmp_path, **{"stages.manual.images_per_round": 15}))
    summary = run_rounds(cfg, CHEAP)
    assert [r["images"] for r in summary["rounds"]] == [15, 5, 0]
    assert "no unannotated images left" in summary["rounds"][2]["note"]
    assert summary["auto"] is None


def test_selection_is_deterministic_and_disjoint():
    ids = [f"i{k:02d}" for k in range(30)]
    a = select_images(ids, set(), 5, seed=0, round=1)
    assert a == select_images(list(reversed(ids)), set(), 5, seed=0, round=1) == sorted(a)
    b = select_images(ids, set(a), 5, seed=0, round=2)
    assert not set(a) & set(b)
    assert select_images(ids, set(a) | set(b), None, seed=0, round=3) == sorted(set(ids) - set(a) - set(b))


def test_promotion_decision_edges():
    assert promotion_decision("miou@1", {"miou@1": 0.5}, None, 0.0)["promoted"]
    tie = promotion_decision("miou@1", {"miou@1": 0.5}, {"miou@1": 0.5}, 0.0)
    assert not tie["promoted"] and "is not better" in tie["reason"] and tie["test"] == "difference of means"
    assert not promotion_decision("miou@1", {"miou@1": 0.52}, {"miou@1": 0.5}, 0.05)["promoted"]
    with pytest.raises(StepFailed, match="the evaluation has no 'miou@1' \\(has: box_miou\\)"):
        promotion_decision("miou@1", {"box_miou": 0.5}, None, 0.0)


def test_promotion_pairs_the_holdout_masks_and_does_not_promote_noise():
    """Per-mask scores of both models on the same holdout masks: a gain the holdout can't tell from noise is
    not promoted (the plain difference of means would have promoted it), a real one is, and the interval is
    recorded; an AP metric (no per-mask scores) falls back to the difference of means."""
    rng = np.random.default_rng(0)
    current = rng.uniform(0.3, 0.9, 120)
    jitter = rng.normal(0, 0.08, 120)
    noisy = current + 0.004 + jitter - jitter.mean()  # +0.004 on average, per-mask noise 0.08
    better = np.clip(current + rng.normal(0.05, 0.03, 120), 0, 1)

    def ev(scores):
        return {"miou@1": float(np.mean(scores)), "per_mask": {"miou@1": scores.tolist()}, "AP": 0.2}

    noise = promotion_decision("miou@1", ev(noisy), ev(current), 0.0)
    assert np.mean(noisy) > np.mean(current)  # the old rule would promote this
    assert not noise["promoted"] and noise["interval"][0] <= 0 <= noise["interval"][1]
    assert "paired bootstrap over 120 holdout masks" == noise["test"] and "interval" in noise["reason"]
    real = promotion_decision("miou@1", ev(better), ev(current), 0.0)
    assert real["promoted"] and real["interval"][0] > 0
    assert not promotion_decision("miou@1", ev(better), ev(current), 0.2)["promoted"]  # the margin counts
    plain = promotion_decision("miou@1", ev(noisy), ev(current), 0.0, confidence=0.0)
    assert plain["promoted"] and plain["test"] == "difference of means"
    ap = promotion_decision("AP", {"AP": 0.25, "per_mask": {}}, {"AP": 0.2}, 0.0)
    assert ap["promoted"] and ap["interval"] is None


def test_promotion_weighs_the_configured_metrics_and_refuses_forgetting():
    """A candidate better on boxes but worse on 1-click mIoU: the metric mix decides. A candidate better on the
    holdout that falls on the general holdout by more than the margin is refused (the forgetting case:
    0.496 -> 0.270 on the starting domain), one within the margin is promoted."""
    rng = np.random.default_rng(1)
    n = 150
    cur_click, cur_box = rng.uniform(0.4, 0.8, n), rng.uniform(0.5, 0.9, n)

    def ev(click, box, general=None):
        out = {"miou@1": float(np.mean(click)), "box_miou": float(np.mean(box)),
               "per_mask": {"miou@1": click.tolist(), "box_miou": box.tolist()}}
        if general is not None:
            out["general"] = {"miou@1": general, "box_miou": general}
        return out

    cand_click = np.clip(cur_click - 0.017 + rng.normal(0, 0.01, n), 0, 1)
    cand_box = np.clip(cur_box + 0.08 + rng.normal(0, 0.01, n), 0, 1)
    current, candidate = ev(cur_click, cur_box), ev(cand_click, cand_box)
    assert not promotion_decision("miou@1", candidate, current, 0.0)["promoted"]
    mixed = promotion_decision({"miou@1": 1.0, "box_miou": 1.0}, candidate, current, 0.0)
    assert mixed["promoted"] and mixed["metric"] == "0.5 miou@1 + 0.5 box_miou"
    assert mixed["candidate"] == pytest.approx((candidate["miou@1"] + candidate["box_miou"]) / 2)
    assert mixed["interval"][0] > 0  # the mix is paired per mask
    click_heavy = promotion_decision({"miou@1": 9.0, "box_miou": 1.0}, candidate, current, 0.0)
    assert not click_heavy["promoted"]

    better = np.clip(cur_click + 0.06 + rng.normal(0, 0.01, n), 0, 1)
    forgets = promotion_decision("miou@1", ev(better, cur_box, general=0.270), ev(cur_click, cur_box, general=0.496),
                                 0.0, general_max_drop=0.02)
    assert not forgets["promoted"] and "forgets the general holdout" in forgets["reason"]
    assert forgets["general"]["delta"] == pytest.approx(-0.226) and not forgets["general"]["ok"]
    keeps = promotion_decision("miou@1", ev(better, cur_box, general=0.485), ev(cur_click, cur_box, general=0.496),
                               0.0, general_max_drop=0.02)
    assert keeps["promoted"] and keeps["general"]["ok"] and "general holdout -0.0110" in keeps["reason"]
    unguarded = promotion_decision("miou@1", ev(better, cur_box, general=0.270), ev(cur_click, cur_box, general=0.496),
                                   0.0, general_max_drop=None)
    assert unguarded["promoted"] and unguarded["general"]["policy"] == "report"  # measured, reported, not a gate
    assert unguarded["general"]["delta"] == pytest.approx(-0.226) and "reported only" in unguarded["reason"]


def test_forgetting_is_weighed_against_the_gain_and_the_starting_model():
    """Issue 30: the case measured on real images — round 1's candidate +0.31 on the user's holdout, the synthetic
    starting set's general holdout -0.036 — is promoted under the default policy ("weigh": a fall up to a
    quarter of the gain) and refused under "block" (the old rule); "report" never refuses. Falls that each stay
    within the allowance but add up are caught against the starting model."""
    rng = np.random.default_rng(2)
    n = 120

    def ev(click, general):
        return {"miou@1": float(np.mean(click)), "per_mask": {"miou@1": click.tolist()},
                "general": {"miou@1": general}}

    start_click = rng.uniform(0.1, 0.4, n)
    start = ev(start_click, 0.50)
    big_gain = ev(np.clip(start_click + 0.31 + rng.normal(0, 0.02, n), 0, 1), 0.464)
    weighed = promotion_decision("miou@1", big_gain, start, 0.0, 0.95, 0.02, start)
    assert weighed["promoted"] and weighed["general"]["allowed"] == pytest.approx(0.25 * weighed["delta"])
    blocked = promotion_decision("miou@1", big_gain, start, 0.0, 0.95, 0.02, start, forgetting="block")
    assert not blocked["promoted"] and "more than the 0.0200 allowed" in blocked["reason"]
    assert promotion_decision("miou@1", big_gain, start, 0.0, 0.95, 0.02, start, forgetting="report")["promoted"]

    # a small gain may not pay for a larger fall
    small_gain = ev(np.clip(start_click + 0.04 + rng.normal(0, 0.005, n), 0, 1), 0.464)
    assert not promotion_decision("miou@1", small_gain, start, 0.0, 0.95, 0.02, start)["promoted"]

    # round after round: each fall within the allowance for the model in use, the sum not
    in_use = ev(np.clip(start_click + 0.04, 0, 1), 0.485)
    next_one = ev(np.clip(start_click + 0.08 + rng.normal(0, 0.005, n), 0, 1), 0.47)
    creeping = promotion_decision("miou@1", next_one, in_use, 0.0, 0.95, 0.02, start)
    assert creeping["general"]["delta"] == pytest.approx(-0.015)  # within 0.02 of the model in use
    assert creeping["general"]["cumulative_delta"] == pytest.approx(-0.03)  # beyond max(0.02, 0.25 x 0.08)
    assert not creeping["promoted"] and "for the starting model" in creeping["reason"]


# --- resume --------------------------------------------------------------------------------------------

def test_rerun_of_a_finished_run_redoes_nothing(tmp_path):
    cfg = load_config(_config(tmp_path))
    first = run_rounds(cfg, CHEAP)
    calls = _trace_lines(cfg)
    again = run_rounds(cfg, CHEAP)
    assert _trace_lines(cfg) == calls
    assert again == first


def test_resume_after_sigkill_never_redoes_a_committed_step(tmp_path):
    reference = load_config(_config(tmp_path / "ref"))
    run_rounds(reference, CHEAP)

    path = _config(tmp_path / "killed")
    cfg = load_config(path)
    proc = _spawn(path, SA_TEST_HANG_AT="train:2")
    _wait_for(Path(cfg.workdir) / "hung-train:2", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    ledger = Ledger(Path(cfg.workdir) / LEDGER_FILE)  # parses: the file is never torn
    assert ledger.get("r2.train")["status"] == "started"
    assert [e["step"] for e in ledger.entries() if e["status"] == "done"] == [
        "r0.init", "r0.eval", "r1.select", "r1.manual", "r1.train", "r1.eval", "r1.promote",
        "r2.select", "r2.manual"]
    before = _trace_lines(cfg)

    proc = _spawn(path, SA_TEST_HANG_AT="train:2")  # the marker exists: no hang this time
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    after = _trace_lines(cfg)[len(before):]
    # the rerun starts at the unfinished step: nothing committed ran again
    assert after[0][0] == "train" and after[0][1] == 2
    assert not [e for e in after if e[0] in ("init", "manual") or (e[0] == "train" and e[1] == 1)]
    assert sum(1 for e in _trace_lines(cfg) if e[:2] == ["train", 2]) == 2

    done = Ledger(Path(cfg.workdir) / LEDGER_FILE)
    assert done.get("r2.train")["attempts"] == 2
    ref = Ledger(Path(reference.workdir) / LEDGER_FILE)
    strip = lambda e: json.loads(json.dumps(e).replace(str(Path(reference.workdir).resolve()), "W")
                                 .replace(str(Path(cfg.workdir).resolve()), "W"))
    assert [strip(e)["outputs"] for e in done.entries()] == [strip(e)["outputs"] for e in ref.entries()]


def test_sigterm_and_ctrl_c_are_recorded_as_interrupted(tmp_path):
    path = _config(tmp_path)
    cfg = load_config(path)
    proc = _spawn(path, SA_TEST_HANG_AT="semi:3")
    _wait_for(Path(cfg.workdir) / "hung-semi:3", proc)
    proc.send_signal(signal.SIGTERM)  # what `ray job stop` sends
    assert proc.wait(timeout=30) != 0
    rec = Ledger(Path(cfg.workdir) / LEDGER_FILE).get("r3.semi")
    assert rec["status"] == "interrupted" and rec["error"] == "interrupted"

    proc = _spawn(path, SA_TEST_HANG_AT="auto:4")
    _wait_for(Path(cfg.workdir) / "hung-auto:4", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) != 0
    ledger = Ledger(Path(cfg.workdir) / LEDGER_FILE)
    assert ledger.get("r3.semi")["status"] == "done" and ledger.get("r3.semi")["attempts"] == 2
    assert ledger.get("r4.auto")["status"] == "interrupted"


def test_a_failing_step_is_named_recorded_and_resumed(tmp_path, monkeypatch):
    cfg = load_config(_config(tmp_path))
    monkeypatch.setenv("SA_TEST_FAIL_AT", "semi:3")
    with pytest.raises(StepFailed, match=r"^r3\.semi: semi:3: disk full \(test\)$"):
        run_rounds(cfg, CHEAP)
    rec = Ledger(Path(cfg.workdir) / LEDGER_FILE).get("r3.semi")
    assert rec["status"] == "failed" and rec["error"] == "semi:3: disk full (test)"
    run_rounds(cfg, CHEAP)
    ledger = Ledger(Path(cfg.workdir) / LEDGER_FILE)
    assert ledger.get("r3.semi")["attempts"] == 2 and ledger.get("r4.auto")["status"] == "done"


def test_a_step_returning_a_non_dict_fails_clearly(tmp_path):
    cfg = load_config(_config(tmp_path))
    steps = Steps(**{**CHEAP.__dict__, "evaluate": lambda cfg, ckpt: 0.5})
    with pytest.raises(StepFailed, match=r"^r0\.eval: returned float, expected a dict$"):
        run_rounds(cfg, steps)


def test_changed_plan_after_a_commit_is_refused(tmp_path):
    run_rounds(load_config(_config(tmp_path)), CHEAP)
    changed = load_config(_config(tmp_path, **{"stages.manual.images_per_round": 3}))
    with pytest.raises(LedgerError, match=r"step r1\.select was committed with other inputs \(count\)"):
        run_rounds(changed, CHEAP)


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
    cfg = load_config(_config(tmp_path))
    with WorkdirLock(cfg.workdir):
        with pytest.raises(LedgerError, match=f"another sa-engine run is using this work dir \\(pid {os.getpid()}\\)"):
            run_rounds(cfg, CHEAP)
    run_rounds(cfg, CHEAP)  # released


def test_a_corrupt_ledger_is_named(tmp_path):
    cfg = load_config(_config(tmp_path))
    Path(cfg.workdir).mkdir(parents=True)
    (Path(cfg.workdir) / LEDGER_FILE).write_text('{"step": "r0.init", "status": "done"}\n{"step": \n')
    with pytest.raises(LedgerError, match=r"ledger\.jsonl:2: not valid JSON"):
        run_rounds(cfg, CHEAP)


# --- end to end: the real stages, trainer and evaluator ------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.labelstudio
def test_sa_engine_run_end_to_end(tmp_path, labelstudio_server, ray_cluster):
    """`sa-engine run` on a few tiny images: real Label Studio (simulated annotators), local Ray (Ray Data for
    the automatic stage, Ray Train for retraining), the holdout gate; then a rerun that redoes nothing and
    `sa-engine report`."""
    from typer.testing import CliRunner

    from engine.cli import app
    from engine.integrations.labelstudio import free_port
    from engine.integrations.synth import write_synthetic_dataset
    from storage.shards import MaskStore

    write_synthetic_dataset(tmp_path / "data", n_images=8, seed=0, size=96)
    data = {
        "workdir": str(tmp_path / "run"),
        # No COCO holdout: 2 of the 8 images are carved out and drawn (by the simulated annotators, through the
        # real Label Studio) in a project of their own before round 1, as a team without a holdout file runs it.
        "images": {"source": str(tmp_path / "data" / "images"),
                   "ground_truth": str(tmp_path / "data" / "annotations.json"),
                   "holdout_from_source": 2, "holdout_source": None, "holdout_ground_truth": None},
        "storage": {"root": str(tmp_path / "store")},
        "simulate": {"max_clicks": 3},
        "stages": {"manual": {"rounds": 1, "images_per_round": 2},
                   "semi": {"rounds": 1, "images_per_round": 2},
                   # An all-but-untrained model is rarely confident and its masks are large: loose filters (a
                   # mask is dropped only when it covers the whole image), so the stage usually writes some.
                   "auto": {"points_per_side": 8, "num_actors": 1, "pred_iou_thresh": 0.0,
                            "stability_score_thresh": 0.0, "min_mask_region_area": 0, "max_mask_fraction": 1.0}},
        "labelstudio": {"managed": False, "url": labelstudio_server.url, "token": labelstudio_server.token,
                        "ml_backend_port": free_port()},
        # Steps, not seconds, bound training, so the rounds' models do not depend on the machine's speed.
        "train": {"steps": 6},
    }
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    # 4: a six-step model's prefills usually miss the semi round's precision target, and the run says so
    assert result.exit_code in (0, 4), result.output
    assert (result.exit_code == 4) == ("missed its target" in result.output)

    cfg = load_config(path)
    ledger = Ledger(Path(cfg.workdir) / LEDGER_FILE)
    steps = [e["step"] for e in ledger.entries()]
    assert steps == ["r0.init", "r0.holdout", "r0.eval", "r1.select", "r1.manual", "r1.train", "r1.eval",
                     "r1.promote", "r2.select", "r2.semi", "r2.train", "r2.eval", "r2.promote", "r3.select", "r3.auto"]
    assert all(e["status"] == "done" for e in ledger.entries())
    held = ledger.get("r0.holdout")["inputs"]["image_ids"]
    hold = ledger.get("r0.holdout")["outputs"]
    assert len(held) == 2 and 0 < ledger.get("r0.eval")["outputs"]["n_masks"] <= hold["masks"]
    annotated = {i for r in (1, 2, 3) for i in ledger.get(f"r{r}.select")["outputs"]["image_ids"]}
    assert not annotated & set(held)  # the holdout is never annotated in a round, nor trained on
    current = json.loads((Path(cfg.workdir) / "models" / "current.json").read_text())["checkpoint"]
    assert current == ledger.get("r2.promote")["outputs"]["checkpoint"]  # what the ML backend service follows
    for r in (1, 2):
        decision = ledger.get(f"r{r}.promote")["outputs"]
        assert decision["metric"] == "miou@1" and decision["reason"]
    store = MaskStore(cfg.storage.root)
    table = store.read_table(columns=["stage", "round", "image_id"]).to_pandas()
    # Whether a six-step model's masks survive even loose filters depends on the CPU's rounding (early
    # training is chaotic), so the automatic stage is checked for what it did, not for a mask count;
    # tests/test_auto_stage.py checks the masks themselves.
    assert {"manual", "semi"} <= set(table["stage"]) <= {"manual", "semi", "auto"}
    auto_ids = set(ledger.get("r3.select")["outputs"]["image_ids"])
    assert len(auto_ids) == 2 and set(table.loc[table["stage"] == "auto", "image_id"]) <= auto_ids
    assert not set(table["image_id"]) & set(held)  # the holdout's masks live in a store of their own
    auto = ledger.get("r3.auto")["outputs"]
    assert auto["images"] == 2 and auto["quarantined"] == 0
    assert int((table["stage"] == "auto").sum()) == auto["masks"]
    assert store.images_done("auto") == auto_ids

    before = (Path(cfg.workdir) / LEDGER_FILE).read_text()
    again = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert again.exit_code == result.exit_code, again.output
    assert (Path(cfg.workdir) / LEDGER_FILE).read_text() == before  # nothing redone

    report = CliRunner().invoke(app, ["report", "--config", str(path)])
    assert report.exit_code == 0, report.output
    md = (Path(cfg.workdir) / "report" / "report.md").read_text()
    assert "| Assisted-manual | 1 | 2 |" in md and "| Fully automatic | 1 | 2 |" in md


def test_a_retraining_stopped_short_by_its_guard_is_named_and_marked_not_comparable(tmp_path):
    """Issue 30: when the wall-clock guard stops a retraining before its steps, the round's line says so
    ("trained N of M steps"), and the promotion record carries the steps and `comparable: false`; a full
    round carries its steps and `comparable: true`."""
    from dataclasses import replace

    def short_train(cfg, init_checkpoint, out_dir, round):
        out = train(cfg, init_checkpoint, out_dir, round)
        planned = cfg.train.steps
        steps = 28 if round == 1 else planned
        note = None if steps == planned else f"trained {steps} of {planned} steps (stopped by the wall-clock guard)"
        return {**out, "steps": steps, "planned_steps": planned, "short": note is not None,
                **({"note": note} if note else {})}

    cfg = load_config(_config(tmp_path, **{"train.steps": 700}))
    lines: list[str] = []
    run_rounds(cfg, replace(CHEAP, train=short_train), progress=lines.append)
    assert "r1.train: trained 28 of 700 steps (stopped by the wall-clock guard)" in lines
    ledger = Ledger(Path(cfg.workdir) / LEDGER_FILE)
    training = {r: ledger.get(f"r{r}.promote")["outputs"]["training"] for r in (1, 2)}
    assert {k: training[1][k] for k in ("steps", "planned_steps", "comparable")} == {
        "steps": 28, "planned_steps": 700, "comparable": False}
    assert {k: training[2][k] for k in ("steps", "planned_steps", "comparable")} == {
        "steps": 700, "planned_steps": 700, "comparable": True}


def test_a_model_that_learned_nothing_is_named():
    """Issue 30: a holdout score at what whole-image masks (or empty masks) would score is named in one line
    with the likely causes; a real score is not."""
    import tempfile

    from engine.rounds import learned_nothing, trivial_baseline

    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10},
                       {"id": 2, "file_name": "b.png", "height": 20, "width": 10}],
            "annotations": [{"image_id": 1, "area": 5}, {"image_id": 1, "area": 15}, {"image_id": 2, "area": 20}]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(coco, f)
    baseline = trivial_baseline(f.name)
    assert abs(baseline - (0.05 + 0.15 + 0.1) / 3) < 1e-9
    note = learned_nothing({"miou@1": baseline + 0.005}, baseline)
    assert note and "whole-image masks" in note and "train.steps" in note
    assert "empty masks" in learned_nothing({"miou@1": 0.004}, baseline)
    assert learned_nothing({"miou@1": 0.42}, baseline) is None
