"""The data engine's round loop and its ledger.

Rounds as SA-1B ran them: the assisted-manual stage for `stages.manual.rounds` rounds, the
semi-automatic stage for `stages.semi.rounds` rounds, then the fully automatic stage over the
remaining (or all) images with the final model. After every manual/semi round the model is
retrained from the current checkpoint on all verified masks so far, evaluated on the frozen
holdout, and promoted only if it beats the current model on the primary metric
(`eval.promote_metric`, holdout 1-click mIoU by default) by more than the holdout's noise: the paired
bootstrap interval of the per-mask differences must lie above `eval.promote_min_delta`
(`eval.promote_confidence`); otherwise the current model is kept and the ledger says why, with the interval.

The ledger (`<workdir>/ledger.jsonl`) holds one JSON line per step: its inputs, outputs, timing
and status. It is rewritten atomically (temp + fsync + rename) after every change, so a crash,
Ctrl-C or SIGKILL leaves either the old or the new ledger, never a torn one. A rerun walks the
same plan, takes the outputs of every `done` step from the ledger, and resumes at the first step
that is not done; a committed step is never run twice.

The loop takes its step functions as parameters (`Steps`); the defaults call the real stages,
trainer and evaluator, and tests pass cheap real functions.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from engine.integrations import runtime
from engine.integrations.config import EngineConfig
# Re-exported: the loop's names, as its callers (the CLI, the report, tests) import them from here
from engine.ledger import (_jsonable, _now, _one_line, DONE, FAILED, INTERRUPTED, Ledger, LEDGER_FILE,
                           LEDGER_VERSION, LedgerError, STARTED, StepFailed, WorkdirLock)  # noqa: F401
from engine.promotion import (_forgetting, FORGETTING, learned_nothing, metric_label, metric_scores,
                              paired_interval, promotion_decision, trivial_baseline)  # noqa: F401
from engine.round_steps import (default_auto, default_bootstrap, default_evaluate, default_general_holdout,
                                default_holdout, default_init_model, default_list_images, default_manual,
                                default_review, default_select, default_semi, default_train, holdout_completeness,
                                select_images, Steps, write_holdout_folder)  # noqa: F401

# --- the plan and the loop --------------------------------------------------------------------

def stage_of_round(cfg: EngineConfig, round: int) -> str:
    """Rounds 1..N1 are manual, N1+1..N1+N2 semi, N1+N2+1 is the automatic stage."""
    n1, n2 = cfg.stages.manual.rounds, cfg.stages.semi.rounds
    return "manual" if round <= n1 else "semi" if round <= n1 + n2 else "auto"


def _promote(cfg: EngineConfig, candidate: str, candidate_eval: dict, current: str, current_eval: dict | None,
             start_eval: dict | None) -> dict:
    e = cfg.eval
    decision = promotion_decision(e.promote_metric, candidate_eval, current_eval, e.promote_min_delta,
                                  e.promote_confidence, e.general_max_drop, start_eval, e.forgetting,
                                  e.forgetting_share)
    return {**decision, "checkpoint": candidate if decision["promoted"] else current}


HEARTBEAT_S = 30.0  # a long step says it is still running at least this often


class _Heartbeat:
    """While a step runs, a line every `every` seconds: which step, how long so far (a user watching a
    two-minute retraining must not take silence for a hang)."""

    def __init__(self, step: str, progress: Callable[[str], None], every: float = HEARTBEAT_S):
        self.step, self.progress, self.every = step, progress, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{step}", daemon=True)
        self.t0 = time.monotonic()

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            self.progress(f"{self.step}: running, {time.monotonic() - self.t0:.0f} s so far")

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=1)


class _Runner:
    def __init__(self, ledger: Ledger, progress: Callable[[str], None]):
        self.ledger = ledger
        self.progress = progress

    def step(self, step: str, kind: str, round: int, inputs: dict, fn: Callable[[], dict]) -> dict:
        """Run `fn` as ledger step `step` unless the ledger already has it done (then its outputs)."""
        inputs = json.loads(json.dumps(_jsonable(inputs)))
        rec = self.ledger.get(step)
        if rec is not None and rec["status"] == DONE:
            if rec["inputs"] != inputs:
                diff = sorted(k for k in set(rec["inputs"]) | set(inputs)
                              if rec["inputs"].get(k) != inputs.get(k))
                raise LedgerError(f"{self.ledger.path}: step {step} was committed with other inputs "
                                  f"({', '.join(diff)}); use a new workdir to start over")
            self.progress(f"{step}: done earlier ({rec['seconds']:.1f} s), skipped")
            return rec["outputs"]
        if rec is not None:
            self.progress(f"{step}: resuming ({rec['status']} before)")
        else:
            self.progress(f"{step}: started")
        self.ledger.begin(step, kind, round, inputs)
        t0 = time.monotonic()
        try:
            with _Heartbeat(step, self.progress):
                out = fn()
        except KeyboardInterrupt:
            self.ledger.fail(step, "interrupted", time.monotonic() - t0, status=INTERRUPTED)
            raise
        except Exception as e:
            self.ledger.fail(step, _one_line(e), time.monotonic() - t0)
            raise StepFailed(f"{step}: {_one_line(e)}") from e
        if not isinstance(out, dict):
            self.ledger.fail(step, f"returned {type(out).__name__}, expected a dict", time.monotonic() - t0)
            raise StepFailed(f"{step}: returned {type(out).__name__}, expected a dict")
        seconds = time.monotonic() - t0
        stored = self.ledger.finish(step, out, seconds)
        self.progress(f"{step}: done in {seconds:.1f} s")
        return stored


def _raise_interrupt(signum, frame):  # SIGTERM (e.g. `ray job stop`) ends a run like Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def run_rounds(cfg: EngineConfig, steps: Steps | None = None,
               progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Run (or resume) the whole engine for `cfg`; returns a summary.

    Summary: {ledger, rounds: [{round, stage, images, decision, checkpoint}], final_checkpoint,
    auto: stage summary | None}. Raises StepFailed (one line naming the step) when a step fails;
    the ledger keeps everything committed before it, so a rerun continues from there.
    """
    steps = steps or Steps()
    workdir = Path(cfg.workdir).resolve()
    models = workdir / "models"
    with WorkdirLock(workdir):
        ledger = Ledger(workdir / LEDGER_FILE)
        run = _Runner(ledger, progress)
        old_term = None
        if threading.current_thread() is threading.main_thread():
            old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return _run(cfg, steps, run, ledger, models)
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)


def _run(cfg: EngineConfig, steps: Steps, run: _Runner, ledger: Ledger, models: Path) -> dict:
    n_rounds = cfg.stages.manual.rounds + cfg.stages.semi.rounds
    metric, min_delta = cfg.eval.promote_metric, cfg.eval.promote_min_delta

    init = run.step("r0.init", "init", 0, {"checkpoint": cfg.model.checkpoint, "preset": cfg.model.preset},
                    lambda: steps.init_model(cfg, str(models / "r0-init")))
    current = init["checkpoint"]
    if cfg.model.bootstrap_steps > 0:
        boot = run.step("r0.bootstrap", "bootstrap", 0,
                        {"checkpoint": current, "steps": cfg.model.bootstrap_steps},
                        lambda: steps.bootstrap(cfg, current, str(models / "r0-bootstrap")))
        current = boot["checkpoint"]
        if boot.get("note"):
            run.progress(f"r0.bootstrap: {boot['note']}")
    runtime.record_current_model(cfg, current, 0)
    if n_rounds > 0 and not cfg.images.general_holdout_source:
        if cfg.model.bootstrap_steps > 0 and cfg.model.bootstrap_general_holdout > 0:
            # forgetting is always measured: the starting set gives a general holdout of its own
            gen = run.step("r0.general", "general", 0, {"images": cfg.model.bootstrap_general_holdout},
                           lambda: steps.general_holdout(cfg))
            cfg = cfg.model_copy(deep=True)
            cfg.images.general_holdout_source = gen["source"]
            cfg.images.general_holdout_ground_truth = gen["ground_truth"]
        else:
            run.progress("forgetting is not measured: no general holdout of the starting domain (a start without "
                         "its data); give one with images.general_holdout_source / general_holdout_ground_truth "
                         "(docs/people.md)")
    candidates: list[str] | None = None
    used: set[str] = set()
    if cfg.images.holdout_from_source > 0 and n_rounds > 0:
        # The holdout from the user's own images: chosen first, drawn by people, never selected or trained on
        candidates = steps.list_images(cfg)
        held = select_images(candidates, set(), cfg.images.holdout_from_source, cfg.seed, 0)
        cur = current
        hold = run.step("r0.holdout", "holdout", 0, {"checkpoint": cur, "image_ids": held},
                        lambda: steps.holdout(cfg, cur, held))
        run.progress(f"r0.holdout: {hold.get('images')} images, {hold.get('masks')} masks"
                     + (f" ({hold['truth_masks']} objects in the ground truth)"
                        if hold.get("truth_masks") is not None else ""))
        for line in hold.get("warnings") or []:
            run.progress(f"r0.holdout: warning: {line}")
        cfg = cfg.model_copy(deep=True)
        cfg.images.holdout_source, cfg.images.holdout_ground_truth = hold["source"], hold["ground_truth"]
        used.update(held)
    current_eval = start_eval = None
    baseline = None
    if n_rounds > 0:
        cur = current
        current_eval = run.step("r0.eval", "eval", 0, {"checkpoint": cur},
                                lambda: steps.evaluate(cfg, cur))
        start_eval = current_eval
        truth = cfg.path(cfg.images.holdout_ground_truth) if cfg.images.holdout_ground_truth else None
        baseline = trivial_baseline(truth) if truth and Path(truth).is_file() else None
        note = learned_nothing(current_eval, baseline)
        if note and (cfg.model.bootstrap_steps > 0 or cfg.model.checkpoint):  # (a fresh model is expected to)
            run.progress(f"r0.eval: warning: {note}")

    rounds: list[dict] = []
    for r in range(1, n_rounds + 1):
        stage = stage_of_round(cfg, r)
        per_round = getattr(cfg.stages, stage).images_per_round
        if candidates is None and not ledger.is_done(f"r{r}.select"):
            candidates = steps.list_images(cfg)
        cands, taken, cur = candidates, sorted(used), current
        inputs = {"stage": stage, "count": per_round, "excluded": len(taken)}
        if cfg.stages.select != "random":  # (random keeps the inputs earlier ledgers committed)
            inputs.update(how=cfg.stages.select, checkpoint=cur)
        sel = run.step(f"r{r}.select", "select", r, inputs,
                       lambda: steps.select(cfg, r, cur, cands, set(taken), per_round, run.progress))
        image_ids = sel["image_ids"]
        used.update(image_ids)
        if not image_ids:
            note = f"r{r}: no unannotated images left for the {stage} stage; round skipped"
            run.progress(note)
            rounds.append({"round": r, "stage": stage, "images": 0, "decision": None, "checkpoint": current,
                           "note": note})
            continue
        cur = current
        summary = run.step(f"r{r}.{stage}", stage, r, {"checkpoint": cur, "image_ids": image_ids},
                           lambda: getattr(steps, stage)(cfg, r, cur, image_ids))
        if stage == "semi" and cfg.stages.review.enabled:  # doubted masks back to people before training
            run.step(f"r{r}.review", "review", r, {"checkpoint": cur}, lambda: steps.review(cfg, r, cur))
        out_dir = str(models / f"r{r}")
        trained = run.step(f"r{r}.train", "train", r, {"init_checkpoint": cur, "out_dir": out_dir},
                           lambda: steps.train(cfg, cur, out_dir, r))
        cand = trained["checkpoint"]
        if trained.get("note"):
            run.progress(f"r{r}.train: {trained['note']}")
        cand_eval = run.step(f"r{r}.eval", "eval", r, {"checkpoint": cand}, lambda: steps.evaluate(cfg, cand))
        note = learned_nothing(cand_eval, baseline)
        if note:
            run.progress(f"r{r}.eval: warning: {note}")
        training = {"steps": trained.get("steps"), "planned_steps": trained.get("planned_steps"),
                    "comparable": not trained.get("short", False), "learned_nothing": note}
        decision = run.step(f"r{r}.promote", "promote", r,
                            {"candidate": cand, "current": cur, "metric": metric, "min_delta": min_delta},
                            lambda: {**_promote(cfg, cand, cand_eval, cur, current_eval, start_eval),
                                     "training": training})
        if decision["promoted"]:
            current, current_eval = cand, cand_eval
            runtime.record_current_model(cfg, current, r)  # the ML backend service switches to it
        rounds.append({"round": r, "stage": stage, "images": len(image_ids), "summary": summary,
                       "decision": decision, "checkpoint": current})

    auto_summary = None
    if cfg.stages.final_auto != "none":
        r = n_rounds + 1
        if candidates is None and not ledger.is_done(f"r{r}.select"):
            candidates = steps.list_images(cfg)
        cands, taken = candidates, sorted(used) if cfg.stages.final_auto == "remaining" else []
        sel = run.step(f"r{r}.select", "select", r, {"stage": "auto", "scope": cfg.stages.final_auto,
                                                     "excluded": len(taken)},
                       lambda: {"image_ids": select_images(cands, set(taken), None, cfg.seed, r),
                                "candidates": len(cands)})
        if sel["image_ids"]:
            cur, ids = current, sel["image_ids"]
            auto_summary = run.step(f"r{r}.auto", "auto", r, {"checkpoint": cur, "image_ids": ids},
                                    lambda: steps.auto(cfg, r, cur, ids))
        else:
            run.progress(f"r{r}: no images left for the automatic stage")
    return {"ledger": str(ledger.path), "rounds": rounds, "final_checkpoint": current, "auto": auto_summary}
