"""A team at once: simulated annotators clicking together through the real Label Studio and our ML backend.

    python benchmarks/annotators.py [--concurrency 1,5,10,20] [--clicks 12] [--tasks 40] [--size 256]
                                    [--photo-size 1500] [--checkpoint DIR]

Starts a managed Label Studio (its own data directory under a temp folder) and the ML backend as its own
process (`sa-engine ml-backend`, waitress), one project of synthetic scenes (--size) and one of photos
(--photo-size), both connected to the backend. Then, for each concurrency c, c annotator threads each with
their own Label Studio client click objects through Label Studio's interactive endpoint (what the editor calls:
Label Studio -> backend -> Label Studio), a first click then corrective clicks, on tasks of their own. Measured:
- click latency p50/p99 per concurrency, errors, the backend's peak RSS (from /proc);
- first click on a task whose image the backend embedded ahead (`/prefetch`) vs a warm click on it, and the
  first click on a task nobody prefetched (the cost prefetching removes);
- the backend's own cost per click with 0, 100 and 300 earlier brush regions on the task (Label Studio sends
  every earlier region with each call): /predict timed directly with the task as Label Studio serialises it.
Annotators pause between clicks (--think-s, exponential, mean 1.5 s) as people do; --think-s 0 makes every
annotator click back to back, which measures the saturation throughput (clicks_per_s_<c>) instead.
Each annotator is a Label Studio user of their own with their own API token, signed up through the
organisation's invite link as a person does in the browser (the web form, not the SDK: Label Studio's API gives a
token only to the user it belongs to).
The last line is one JSON object with p50_ms_<c>, p99_ms_<c>, clicks_per_s_<c>, errors, first_click_ms, warm_click_ms,
cold_first_click_ms, click_ms_0_regions, click_ms_100_regions, click_ms_300_regions, backend_peak_rss_mb.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def main() -> None:
    from PIL import Image

    from engine.integrations.labelstudio import (LabelStudio, ServerSettings, TaskImage, brush_result, free_port,
                                                 keypoint_context, start_server, stop_server)
    from engine.integrations.synth import make_scene, scene_rng
    from model.clicks import first_click, sample_error_click

    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,5,10,20")
    ap.add_argument("--clicks", type=int, default=12, help="clicks per annotator per concurrency level")
    ap.add_argument("--tasks", type=int, default=40, help="synthetic scenes (tasks) in the main project")
    ap.add_argument("--size", type=int, default=256, help="side of the synthetic scenes (the demo's: 256)")
    ap.add_argument("--photo-size", type=int, default=1500, help="side of the photo project's images (0: none)")
    ap.add_argument("--think-s", type=float, default=1.5,
                    help="an annotator's mean pause between clicks (exponential; SA-1B's assisted-manual stage took "
                         "~14 s a mask with a few clicks each). 0: every annotator clicks back to back (saturation)")
    ap.add_argument("--checkpoint", default=None, help="a model for the backend (default: a fresh compact one)")
    ap.add_argument("--database", default="sqlite", choices=("sqlite", "postgresql"),
                    help="Label Studio's database (postgresql: a managed local cluster)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sa-bench-annotators-")).resolve()
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    truth: dict[str, list[np.ndarray]] = {}
    for i in range(args.tasks):
        px, masks, _ = make_scene(scene_rng(3, i), args.size)
        Image.fromarray(px).save(images / f"scene-{i:03d}.png")
        truth[f"scene-{i:03d}.png"] = [m for m in masks if m.sum() >= 64]
    photos = []
    if args.photo_size:
        for i in range(4):
            px, masks, _ = make_scene(scene_rng(4, i), args.photo_size)
            Image.fromarray(px).save(images / f"photo-{i}.jpg", quality=92)
            truth[f"photo-{i}.jpg"] = [m for m in masks if m.sum() >= 256]
            photos.append(f"photo-{i}.jpg")

    # Label Studio, and the backend as its own process (its memory measured alone)
    ls_dir = work / "labelstudio"
    info = start_server(ServerSettings(data_dir=ls_dir, port=free_port(), document_root=work,
                                       ml_backend_local=True, database=args.database), wait_s=300,
                        log=lambda m: None)
    port = free_port()
    token = "bench-backend-token"
    cfg = {"workdir": str(work / "run"), "images": {"source": str(images), "ground_truth": None},
           "labelstudio": {"managed": False, "url": info.url, "token": info.token, "ml_backend_port": port,
                           "ml_backend_token": token}}
    (work / "engine.yaml").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "engine.cli", "ml-backend", "--config", str(work / "engine.yaml"), "--no-follow"]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    backend_log = open(work / "ml_backend.log", "w")
    backend = subprocess.Popen(cmd, cwd=REPO, stdout=backend_log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    peak = [0.0]
    stop = threading.Event()

    def watch_memory():
        while not stop.wait(0.2):
            peak[0] = max(peak[0], _rss_mb(backend.pid))

    threading.Thread(target=watch_memory, daemon=True).start()
    try:
        _wait_up(url, token, backend)
        ls = LabelStudio(info.url, info.token)

        def project(title: str, ids: list[str]) -> tuple[int, dict[str, int], int]:
            pid = ls.ensure_project(title)
            ls.add_local_storage(pid, images)
            sized = [TaskImage(i, LabelStudio.local_file_url(images / i, work), *Image.open(images / i).size[::-1])
                     for i in ids]
            tasks = ls.import_tasks(pid, sized)
            return pid, tasks, ls.connect_ml_backend(pid, url, "sa-engine", token)

        scenes = sorted(i for i in truth if i.startswith("scene"))
        main_pid, main_tasks, main_backend = project("annotators", scenes)
        # Every image embedded ahead, as a stage does when it publishes (first clicks are then decoder passes)
        _post(url, token, "/prefetch", {"tasks": [{"id": t, "data": {"image_id": i, "height": args.size,
                                                                      "width": args.size}}
                                                  for i, t in main_tasks.items()]})
        _wait_prefetched(url, token)

        # Every annotator a user of their own, with their own token
        tokens = [sign_up(info.url, info.token, f"annotator-{k + 1}@sa-engine.local", f"pw-{k + 1}-{port}")
                  for k in range(max(levels))]
        tokens.append(info.token)  # the warm-up's

        def annotator(who: int, c: int, lat: list, errs: list, jobs: list[str], backend_id: int, sizes: dict):
            client = LabelStudio(info.url, tokens[min(who, len(tokens) - 1)])
            rng = np.random.default_rng(who * 1000 + c)
            done = 0
            for image_id in jobs:
                h, w = sizes[image_id]
                target = truth[image_id][rng.integers(len(truth[image_id]))]
                pts, labs = [first_click(target)], [1]
                pred = None
                while done < args.clicks and len(pts) <= 3:
                    if pred is not None:
                        x, y, lab = sample_error_click(pred, target, rng)
                        pts.append((x, y))
                        labs.append(lab)
                    ctx = keypoint_context(pts, labs, h, w)
                    if args.think_s > 0:
                        time.sleep(rng.exponential(args.think_s))
                    t = time.perf_counter()
                    try:
                        answer = client.predict_interactive(backend_id, sizes["_tasks"][image_id], ctx)
                        lat.append((time.perf_counter() - t) * 1e3)
                        pred = _mask(answer, h, w)
                    except Exception as e:  # counted, the annotator goes on
                        errs.append(f"{type(e).__name__}: {str(e)[:200]}")
                    done += 1
                if done >= args.clicks:
                    return

        figures: dict = {}
        errors: list[str] = []
        sizes = {i: (args.size, args.size) for i in scenes}
        sizes["_tasks"] = main_tasks
        # Warm-up, not counted: Label Studio's and the backend's first requests pay their lazy set-up
        think, args.think_s = args.think_s, 0.0
        annotator(len(tokens) - 1, 0, [], [], scenes, main_backend, sizes)
        args.think_s = think
        for c in levels:
            lat: list[float] = []
            per = [scenes[(k * 7) % len(scenes):] + scenes[:(k * 7) % len(scenes)] for k in range(c)]
            t0 = time.perf_counter()
            _together([lambda k=k: annotator(k, c, lat, errors, per[k], main_backend, sizes) for k in range(c)])
            figures[f"p50_ms_{c}"] = _pct(lat, 50)
            figures[f"p99_ms_{c}"] = _pct(lat, 99)
            figures[f"clicks_per_s_{c}"] = round(len(lat) / (time.perf_counter() - t0), 1)
            print(f"concurrency {c:2d}: {len(lat)} clicks, p50 {figures[f'p50_ms_{c}']} ms, "
                  f"p99 {figures[f'p99_ms_{c}']} ms, errors so far {len(errors)}", flush=True)

        # The same load on the backend alone (no Label Studio in between): whose tail is the tail at 20
        direct: list[float] = []

        def direct_annotator(k: int) -> None:
            rng = np.random.default_rng(500 + k)
            for j in range(args.clicks):
                image_id = scenes[(k * 7 + j) % len(scenes)]
                target = truth[image_id][rng.integers(len(truth[image_id]))]
                body = {"tasks": [{"id": main_tasks[image_id], "data": {"image_id": image_id, "height": args.size,
                                                                         "width": args.size}}],
                        "params": {"context": keypoint_context([first_click(target)], [1], args.size, args.size)}}
                if args.think_s > 0:
                    time.sleep(rng.exponential(args.think_s))
                t = time.perf_counter()
                try:
                    _post(url, token, "/predict", body)
                    direct.append((time.perf_counter() - t) * 1e3)
                except Exception as e:
                    errors.append(f"direct: {type(e).__name__}: {str(e)[:200]}")

        top = max(levels)
        _together([lambda k=k: direct_annotator(k) for k in range(top)])
        figures[f"backend_only_p50_ms_{top}"] = _pct(direct, 50)
        figures[f"backend_only_p99_ms_{top}"] = _pct(direct, 99)
        print(f"backend alone, {top} annotators: p50 {figures[f'backend_only_p50_ms_{top}']} ms, "
              f"p99 {figures[f'backend_only_p99_ms_{top}']} ms", flush=True)

        # Photos: first click with the image embedded ahead, a warm click, and one nobody prefetched
        if photos:
            ph_pid, ph_tasks, ph_backend = project("annotators photos", photos)
            side = args.photo_size
            ahead, cold = photos[:-1], photos[-1]
            _post(url, token, "/prefetch", {"tasks": [{"id": ph_tasks[i], "data": {"image_id": i, "height": side,
                                                                                    "width": side}} for i in ahead]})
            _wait_prefetched(url, token)
            firsts, warms = [], []
            for image_id in ahead:
                target = truth[image_id][0]
                ctx = keypoint_context([first_click(target)], [1], side, side)
                for bucket in (firsts, warms, warms):
                    t = time.perf_counter()
                    ls.predict_interactive(ph_backend, ph_tasks[image_id], ctx)
                    bucket.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            ls.predict_interactive(ph_backend, ph_tasks[cold], keypoint_context([first_click(truth[cold][0])], [1],
                                                                                side, side))
            figures.update(first_click_ms=round(float(np.median(firsts)), 1),
                           warm_click_ms=round(float(np.median(warms)), 1),
                           cold_first_click_ms=round((time.perf_counter() - t) * 1e3, 1))

        # Earlier regions: the task as Label Studio sends it, with 0, 100 and 300 brush regions on it
        image_id = scenes[0]
        target = truth[image_id][0]
        regions = [brush_result(truth[image_id][k % len(truth[image_id])], args.size, args.size,
                                region_id=f"r{k}") for k in range(300)]
        for n in (0, 100, 300):
            task = {"id": main_tasks[image_id], "data": {"image_id": image_id, "height": args.size,
                                                         "width": args.size},
                    "annotations": [{"id": 1, "result": regions[:n]}] if n else [], "predictions": []}
            body = {"tasks": [task], "params": {"context": keypoint_context([first_click(target)], [1],
                                                                            args.size, args.size)}}
            raw = json.dumps(body).encode()  # encoded once: the client's own JSON work is not the backend's
            _post(url, token, "/predict", raw)  # warm
            times = []
            for _ in range(41):
                t = time.perf_counter()
                _post(url, token, "/predict", raw)
                times.append((time.perf_counter() - t) * 1e3)
            figures[f"click_ms_{n}_regions"] = round(float(np.median(times)), 1)
            figures[f"request_kb_{n}_regions"] = round(len(raw) / 1024, 1)

        figures["errors"] = len(errors)
        figures["backend_peak_rss_mb"] = round(peak[0], 1)
        if errors:
            print("errors (first 5):", *errors[:5], sep="\n  ")
        figures["think_s"], figures["database"] = args.think_s, args.database
        print(json.dumps(figures))
    finally:
        stop.set()
        backend.terminate()
        backend.wait(timeout=30)
        backend_log.close()
        stop_server(ls_dir)


def sign_up(url: str, admin_token: str, email: str, password: str) -> str:
    """A new Label Studio user through the organisation's invite link (the sign-up form a person fills in), and
    that user's own API token."""
    import requests

    invite = requests.get(f"{url}/api/invite", headers={"Authorization": f"Token {admin_token}"}, timeout=30)
    invite.raise_for_status()
    link = url + invite.json()["invite_url"]
    with requests.Session() as s:
        s.get(link, timeout=30).raise_for_status()
        r = s.post(link, data={"email": email, "password": password, "csrfmiddlewaretoken": s.cookies["csrftoken"]},
                   headers={"Referer": link}, allow_redirects=False, timeout=30)
        if r.status_code != 302:
            raise SystemExit(f"signing up {email} failed ({r.status_code})")
        token = s.get(f"{url}/api/current-user/token", timeout=30)
        token.raise_for_status()
        return token.json()["token"]


def _together(work: list) -> None:
    """Run these callables at once, one thread each, and wait for all."""
    threads = [threading.Thread(target=fn) for fn in work]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _mask(answer: dict, h: int, w: int) -> np.ndarray:
    from storage.brush_rle import decode_mask

    regions = answer.get("result") or []
    if not regions:
        return np.zeros((h, w), bool)
    return decode_mask(regions[0]["value"]["rle"], h, w)


def _post(url: str, token: str, path: str, body: dict | bytes) -> dict:
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Token {token}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _get(url: str, token: str, path: str) -> dict:
    import urllib.request

    req = urllib.request.Request(url + path, headers={"Authorization": f"Token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _wait_up(url: str, token: str, proc: subprocess.Popen, wait_s: float = 120) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the ML backend exited ({proc.returncode})")
        try:
            if _get(url, token, "/health").get("status") == "UP":
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the ML backend did not come up")


def _wait_prefetched(url: str, token: str, wait_s: float = 600) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _get(url, token, "/health").get("prefetch_pending", 0):
        time.sleep(0.2)


if __name__ == "__main__":
    main()
