import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from engine.integrations.synth import make_scene, scene_rng
from engine.retrain import train_cli
from model.segmenter import Segmenter, preprocess
from model.train import TrainSettings, augment, dataset_sampler, input_frame_sampler, learning_rate, train

torch.set_num_threads(1)


def small_data(n=3, size=96):
    scenes = [make_scene(scene_rng(5, i), size) for i in range(n)]
    return [s[0] for s in scenes], [s[1] for s in scenes]


def test_augment_keeps_image_and_masks_aligned():
    img = np.zeros((20, 30, 3), np.uint8)
    img[2:5, 3:9] = 255
    masks = (img[..., 0] > 0)[None]
    for seed in range(6):
        a, m = augment(img, masks, np.random.default_rng(seed))
        assert a.shape[:2] == m.shape[1:]
        assert m.sum() == masks.sum()
        assert (a[m[0]].mean() > a[~m[0]].mean() + 100)


def test_input_frame_sampler_resizes_once_and_never_serves_a_dead_scene():
    side = 64
    made = []

    def stream(rng):  # a fresh scene every draw, dropped by the caller: ids of dead arrays get reused
        image = rng.integers(0, 256, (128, 96, 3), dtype=np.uint8)
        masks = np.zeros((2, 128, 96), bool)
        y, x = int(rng.integers(0, 100)), int(rng.integers(0, 70))
        masks[0, y:y + 20, x:x + 20] = True
        masks[1] = ~masks[0]
        made.append((image.copy(), masks.copy()))
        return image, masks, np.ones(2, np.float32)

    sample = input_frame_sampler(stream, side)
    rng = np.random.default_rng(0)
    for _ in range(30):
        image, masks, w = sample(rng)
        src_img, src_masks = made[-1]
        assert image.shape == (64, 48, 3) and image.dtype == np.uint8 and masks.shape == (2, 64, 48)
        want = (preprocess([src_img], side)[0][0, :, :64, :48] - preprocess([image], side)[0][0, :, :64, :48]).abs()
        assert float(want.max()) < 1e-4  # the same pixels `preprocess` would feed the encoder
        assert np.array_equal(masks, src_masks[:, ::2, ::2]) and w.tolist() == [1, 1]

    images, masks = small_data(2, size=128)
    kept = input_frame_sampler(dataset_sampler(images, masks), side)
    a, b = kept(np.random.default_rng(1)), kept(np.random.default_rng(1))
    assert a[0] is b[0] and a[1] is b[1]  # resized once, then served from the cache
    big = input_frame_sampler(dataset_sampler(images, masks), 1024)(np.random.default_rng(1))
    assert any(big[0] is im for im in images)  # never enlarged in memory: `preprocess` does it per batch


def test_train_steps_change_weights_and_record_the_curve():
    images, masks = small_data()
    seg = Segmenter.new("compact", seed=0)
    before = {k: v.clone() for k, v in seg.net.state_dict().items()}
    calls = []
    res = train(seg, dataset_sampler(images, masks), TrainSettings(minutes=5, max_steps=3, batch_images=2,
                                                                    masks_per_image=2, eval_every_s=1e9),
                on_eval=lambda s: calls.append(1) or {"miou": 0.0})
    assert res.steps == 3 and np.isfinite(res.final_loss) and res.cpu_seconds > 0
    assert len(res.curve) == 2 and res.curve[0]["step"] == 0 and res.curve[-1]["step"] == 3
    changed = [k for k, v in seg.net.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("image_encoder.") for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed)


def test_corrective_iterations_on_a_share_of_the_masks():
    images, masks = small_data()
    seg = Segmenter.new("compact", seed=0)
    calls = []
    decode = seg.decode

    def spy(feats, points, labels, boxes, mask_input, multimask, pe=None, extras=()):
        calls.append(dict(rows=feats.shape[0], points=points is not None, boxes=boxes is not None,
                          mask=mask_input is not None, multimask=multimask))
        out = decode(feats, points, labels, boxes, mask_input, multimask, pe, extras)
        assert out[0].shape[0] == feats.shape[0] and (points is None or points.shape[0] == feats.shape[0])
        return out

    seg.decode = spy
    train(seg, dataset_sampler(images, masks), TrainSettings(max_steps=8, batch_images=2, masks_per_image=4,
                                                              iterations=2, corrective_share=0.25, seed=3))
    first, second = calls[0::2], calls[1::2]
    assert len(first) == len(second) == 8
    for a, b in zip(first, second):
        assert a["multimask"] and not b["multimask"] and b["points"] and b["mask"] and not a["mask"]
        assert b["rows"] == max(1, round(a["rows"] * 0.25)) < a["rows"]
        assert b["boxes"] == a["boxes"]  # a box-first mask keeps its box beside the corrective click
    assert {a["boxes"] for a in first} == {True, False}


def test_weighted_masks_and_empty_data():
    images, masks = small_data(1)
    w = [np.full(len(masks[0]), 2.0, np.float32)]
    seg = Segmenter.new("compact")
    train(seg, dataset_sampler(images, masks, w), TrainSettings(max_steps=1, batch_images=1, masks_per_image=2))
    with pytest.raises(ValueError, match="no image has a mask"):
        dataset_sampler(images, [np.zeros((0, 96, 96), bool)])


def test_train_cli_writes_a_checkpoint_and_resumes(tmp_path):
    from engine.integrations.synth import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "d", n_images=2, seed=3, size=96)
    s1 = train_cli(tmp_path / "ck1", "compact", str(tmp_path / "d"), steps=3, minutes=None, round_no=1,
                   use_ray=False, workers=1, seed=0)
    doc = json.loads((tmp_path / "ck1" / "sa_engine.json").read_text())
    assert doc["metadata"]["round"] == 1 and doc["metadata"]["data_fingerprint"] and s1["steps"] == 3
    assert (s1["planned_steps"], s1["stopped_by"]) == (3, "steps")
    s2 = train_cli(tmp_path / "ck2", str(tmp_path / "ck1"), str(tmp_path / "d"), steps=3, minutes=None,
                   round_no=2, use_ray=False, workers=1, seed=0)
    doc2 = json.loads((tmp_path / "ck2" / "sa_engine.json").read_text())
    assert doc2["metadata"]["resumed_from"] == str(tmp_path / "ck1") and s2["model_version"] != s1["model_version"]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_loop_writes_a_checkpoint(tmp_path, ray_cluster):
    from engine.integrations.synth import write_synthetic_dataset
    from engine.retrain import train_with_ray

    write_synthetic_dataset(tmp_path / "d", n_images=2, seed=3, size=96)
    seg, metrics = train_with_ray(TrainSettings(max_steps=2, batch_images=1, masks_per_image=2, threads=1),
                                  "compact", {"kind": "folder", "folder": str(tmp_path / "d")}, tmp_path / "out",
                                  tmp_path / "ray", num_workers=2, metadata={"round": 4})
    assert metrics["steps"] == 2
    assert seg.metadata["round"] == 4 and seg.metadata["data_fingerprint"]


def test_training_streams_scenes_from_the_store_with_their_weights(tmp_path):
    """engine/retrain.py store_scenes: the store's verified masks per image (storage.datasets), their images
    from the source, human masks at `manual_weight`; the fingerprint comes from the manifest."""
    from engine.integrations.config import load_config
    from engine.integrations.synth import write_synthetic_dataset
    from engine.retrain import store_scenes, training_fingerprint
    from model.evaluate import load_coco_folder
    from storage.records import MaskRecord, make_mask_id
    from storage.rle import encode_masks, rle_area, rle_bbox
    from storage.shards import MaskStore

    write_synthetic_dataset(tmp_path / "d", n_images=2, seed=3, size=64)
    names, images, masks, _ = load_coco_folder(str(tmp_path / "d"))
    store = MaskStore(str(tmp_path / "store"))
    with store.writer("manual", 1, None) as w:
        for name, m in zip(names, masks):
            rles = encode_masks(m)
            recs = [MaskRecord(image_id=name, mask_id=make_mask_id(name, k), height=64, width=64, rle=r,
                               area=int(a), bbox=list(b), stage="manual", round=1, verified=True,
                               origin="manual" if k % 2 == 0 else "prefill_accepted")
                    for k, (r, a, b) in enumerate(zip(rles, rle_area(rles), rle_bbox(rles)))]
            w.add(recs)
            w.image_done(name, len(recs))
        w.commit()
    cfg = load_config(None, {"workdir": str(tmp_path / "run"), "images.source": str(tmp_path / "d" / "images"),
                             "storage.root": str(tmp_path / "store")})
    sets = [{"root": str(tmp_path / "store"), "images": str(tmp_path / "d" / "images"), "manual_weight": 3.0,
             "filters": {"verified": True}}]
    scenes = list(store_scenes(cfg, sets))
    assert [key for key, *_ in scenes] == [(0, n) for n in sorted(names)]
    for (_, name), got_img, got_m, got_w in scenes:
        i = names.index(name)
        assert np.array_equal(got_img, images[i]) and len(got_m) == len(masks[i])
        for m, w in zip(got_m, got_w):  # the store's order is its own: match masks by content
            k = next(k for k in range(len(masks[i])) if np.array_equal(masks[i][k], m))
            assert w == (3.0 if k % 2 == 0 else 1.0)
    fp = training_fingerprint(cfg, sets)
    assert len(fp) == 16 and fp == training_fingerprint(cfg, sets)


def test_buffered_sampler_is_the_in_memory_sampler_when_the_data_fits_and_bounded_when_not():
    """Issue 21: what fits is held whole (fragments of one image merged) and sampled exactly as dataset_sampler
    samples it; what does not fit streams through a buffer of `buffer_images` scenes, every scene reached."""
    import gc
    import weakref

    from model.train import buffered_sampler

    rng = np.random.default_rng(0)
    data = [(f"img{i}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), rng.random((2, 8, 8)) > 0.5,
             np.full(2, float(i + 1), np.float32)) for i in range(6)]
    # an image whose masks come from two shards arrives twice: merged
    fragments = data[:3] + [(data[1][0], data[1][1], data[1][2][:1], data[1][3][:1])] + data[3:]
    whole = dataset_sampler([d[1] for d in data], [np.concatenate([d[2], d[2][:1]]) if d[0] == "img1" else d[2]
                                                   for d in data],
                            [np.concatenate([d[3], d[3][:1]]) if d[0] == "img1" else d[3] for d in data])
    fits = buffered_sampler(lambda: iter(fragments), buffer_images=16)
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(40):
        a, b = whole(r1), fits(r2)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))

    alive = [0]

    def stream():
        for key, image, masks, weights in data:
            img = image.copy()
            alive[0] += 1
            weakref.finalize(img, lambda: alive.__setitem__(0, alive[0] - 1))
            yield key, img, masks, weights

    bounded = buffered_sampler(stream, buffer_images=2, refresh_every=1)
    seen = set()
    r = np.random.default_rng(1)
    for k in range(200):
        image, _, weights = bounded(r)
        seen.add(float(weights[0]))
        if k % 10 == 0:  # a full collection costs ~0.3 s in a process holding torch: every tenth draw
            gc.collect()
            assert alive[0] <= 3  # the buffer's 2, and the one the stream holds
    assert seen == {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}


def test_cpu_clock_budget_and_ema_keep_training_sane():
    images, masks = small_data(2)
    seg = Segmenter.new("compact", seed=0)
    res = train(seg, dataset_sampler(images, masks),
                TrainSettings(minutes=0.03, clock="cpu", batch_images=1, masks_per_image=2, ema_decay=0.9,
                              loss_size=32, first_point="interior", single_click_fraction=0.5))
    assert res.cpu_seconds >= 0.03 * 60 and res.steps >= 1 and np.isfinite(res.final_loss)
    with pytest.raises(ValueError, match="clock"):
        train(seg, dataset_sampler(images, masks), TrainSettings(max_steps=1, clock="sundial"))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    s = TrainSettings(lr=1e-3, warmup_steps=10, lr_floor=0.1)
    assert learning_rate(s, 0, 0.0) == pytest.approx(1e-4)  # warm-up: 1/10 of the peak
    assert learning_rate(s, 9, 0.0) == pytest.approx(1e-3)
    assert learning_rate(s, 500, 0.5) == pytest.approx(1e-3 * 0.55)
    assert learning_rate(s, 999, 1.0) == pytest.approx(1e-4)
    flat = TrainSettings(lr=1e-3, warmup_steps=10, lr_floor=1.0)
    assert [learning_rate(flat, 50, p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1e-3] * 3)
    assert learning_rate(s, 500, None) == pytest.approx(1e-3)  # a step-count run does not decay


def test_adam_beta2_reaches_the_optimizer(monkeypatch):
    seen = []
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: seen.append(k["betas"]) or real(*a, **k))
    images, masks = small_data(1)
    train(Segmenter.new("compact", seed=0), dataset_sampler(images, masks),
          TrainSettings(max_steps=1, batch_images=1, masks_per_image=1, adam_beta2=0.9))
    assert seen == [(0.9, 0.9)]


def test_muon_trains_the_matrices_and_adamw_the_rest():
    images, masks = small_data(2)
    seg = Segmenter.new("compact", seed=0)
    before = {k: v.clone() for k, v in seg.net.state_dict().items()}
    res = train(seg, dataset_sampler(images, masks), TrainSettings(max_steps=3, batch_images=2, masks_per_image=2,
                                                                    optimizer="muon", muon_lr_scale=2.0))
    assert res.steps == 3 and np.isfinite(res.final_loss)
    state = seg.net.state_dict()
    for k in ("image_encoder.s16.0.0.weight", "mask_decoder.transformer.layers.0.mlp.lin1.weight",  # Muon
              "mask_decoder.mask_tokens.weight", "image_encoder.neck.1.bias"):  # AdamW
        assert not torch.equal(state[k], before[k]), k
    with pytest.raises(ValueError, match="optimizer must be"):
        train(seg, dataset_sampler(images, masks), TrainSettings(max_steps=1, optimizer="sgd"))


def test_ema_averages_and_swaps_back():
    from model.train import _Ema

    net = torch.nn.Linear(2, 1)
    ema = _Ema(net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=10**6)  # past the warm-up: d = decay
    live = net.weight.detach().clone()
    ema.swap(net)
    assert torch.allclose(net.weight, start + 0.5)
    ema.swap(net)
    assert torch.equal(net.weight, live)


def test_interior_first_points_lie_deep_inside():
    from model.clicks import interior_distance
    from model.train import _first_points

    m = np.zeros((1, 40, 60), bool)
    m[0, 5:35, 10:50] = True
    rng = np.random.default_rng(0)
    d = interior_distance(m[0])
    deep = [d[y, x] for x, y in _first_points(np.repeat(m, 200, 0), rng, "interior")]
    flat = [d[y, x] for x, y in _first_points(np.repeat(m, 200, 0), rng, "uniform")]
    assert min(deep) >= 1 and np.mean(deep) > np.mean(flat) + 1
    with pytest.raises(ValueError, match="first_point"):
        _first_points(m, rng, "edge")


def test_loss_on_the_native_grid_matches_the_input_grid_for_blocky_masks():
    from model.train import _step_loss

    gt = torch.zeros((2, 64, 64), dtype=torch.bool)
    gt[0, 8:40, 8:24] = True
    gt[1, 32:64, 0:64] = True
    low = torch.where(F.avg_pool2d(gt[:, None].float(), 2) > 0.5, 6.0, -6.0).repeat(1, 3, 1, 1)
    low[:, 1] = -low[:, 1]  # one output is the complement: never the best
    iou = torch.tensor([[1.0, 0.0, 1.0]] * 2)  # the complement has IoU 0
    w = torch.ones(2)
    for size in (64, None):  # the input frame (SAM) and the native grid
        loss, best, chosen = _step_loss(low, iou, gt, w, 64, TrainSettings(loss_size=size))
        assert (best != 1).all() and chosen.shape == (2, 1, 32, 32) and float(loss) < 0.1


def test_rounds_retrain_on_the_bootstrap_set_too(tmp_path):
    from engine.integrations.config import load_config
    from engine.retrain import training_sets

    cfg = load_config(None, {"workdir": str(tmp_path)})
    assert [s["root"] for s in training_sets(cfg)] == [cfg.path("store")]
    (tmp_path / "bootstrap" / "store").mkdir(parents=True)
    (tmp_path / "bootstrap" / "store" / "manifest.json").write_text("{}")
    sets = training_sets(cfg)
    assert [s["root"] for s in sets] == [cfg.path("store"), str(tmp_path / "bootstrap" / "store")]
    assert sets[0]["manual_weight"] == cfg.train.manual_weight and sets[1]["manual_weight"] == 1.0
    cfg.train.include_bootstrap = False
    assert len(training_sets(cfg)) == 1
    # the bootstrap's own training (its store is the run's store) does not add itself twice
    boot = load_config(None, {"workdir": str(tmp_path), "storage.root": str(tmp_path / "bootstrap" / "store")})
    assert len(training_sets(boot)) == 1


def test_crop_windows_keep_pixels_and_masks_aligned():
    """A crop step sees a window of the input with its masks cut to the same window (offsets on the
    embedding's cell grid): in every window, the pixels of a mask's colour are exactly its gt."""
    from model.segmenter import PIXEL_MEAN, PIXEL_STD
    from model.train import _batch

    side, crop = 128, 64
    image = np.full((256, 256, 3), 128, np.uint8)
    masks = np.zeros((3, 256, 256), bool)
    masks[0, 20:120, 30:200] = masks[1, 140:240, 10:90] = masks[2, 150:250, 120:250] = True
    for c in range(3):
        image[masks[c]] = [255 if k == c else 0 for k in range(3)]
    s = TrainSettings(crop_batch_images=6, masks_per_image=3)
    rng = np.random.default_rng(0)
    offsets_seen, rows = set(), 0
    for _ in range(5):
        pixels, gt, w, owner, offsets = _batch(lambda r: (image, masks, np.ones(3, np.float32)),
                                                       rng, s, side, crop, 8)
        assert pixels.shape == (6, 3, crop, crop) and gt.shape[1:] == (crop, crop)
        offsets_seen |= {tuple(o) for o in offsets.tolist()}
        rgb = pixels * torch.tensor(PIXEL_STD).view(1, 3, 1, 1) + torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
        for p, b in enumerate(owner.tolist()):
            m = gt[p]
            c = int(rgb[b][:, m].mean(1).argmax())
            others = [k for k in range(3) if k != c]
            coloured = rgb[b][c] > rgb[b][others].max(0).values + 60
            iou = (coloured & m).sum() / (coloured | m).sum()
            assert iou > 0.9, (p, offsets[b].tolist(), float(iou))
            rows += 1
    assert rows > 30 and all(o % 8 == 0 and 0 <= o <= side - crop for xy in offsets_seen for o in xy)
    assert len(offsets_seen) > 8
    seg = Segmenter.new("compact", seed=0)
    images, ms = small_data()
    sizes = []
    decode = seg.decode
    seg.decode = lambda feats, *a, **k: sizes.append(feats.shape[-1]) or decode(feats, *a, **k)
    res = train(seg, dataset_sampler(images, ms), TrainSettings(max_steps=4, crop_fraction=0.4, crop_share=0.5,
                                                                crop_batch_images=4, masks_per_image=2))
    assert res.steps == 4 and np.isfinite(res.final_loss)
    assert sizes == [6, 6, 6, 6, 16, 16, 16, 16]  # 0.4 x 16 cells, 2 decoder passes a step; then whole
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="crop_fraction must be in"):
            train(seg, dataset_sampler(images, ms), TrainSettings(max_steps=1, crop_fraction=bad, crop_share=1.0))


def test_windows_of_a_non_square_image_pad_at_the_bottom_right_of_the_frame():
    """A 256x160 scene fills 128x80 (or 80x128 once turned) of the 128 px frame: the rest of every
    window is padding, 0 after normalisation (as `preprocess` pads) and outside every mask."""
    from model.train import _batch

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (256, 160, 3), dtype=np.uint8)
    masks = np.ones((1, 256, 160), bool)
    sampler = input_frame_sampler(lambda r: (image, masks, np.ones(1, np.float32)), 128)
    s = TrainSettings(crop_batch_images=8, batch_images=16, masks_per_image=1, min_area=1)
    whole = set()
    for crop in (64, None):
        pixels, gt, _, owner, offsets = _batch(sampler, rng, s, 128, crop, 8)
        for b, (ox, oy) in enumerate(offsets.tolist()):
            pad = (pixels[b] == 0).all(0)  # jittered pixels are whole numbers, never exactly the mean
            inside = ~pad
            h, w = int(inside.any(1).sum()), int(inside.any(0).sum())
            assert inside[:h, :w].all() and not inside[h:].any() and not inside[:, w:].any()
            assert torch.equal(gt[owner == b][0], inside)  # the mask covers the image, not the padding
            if crop is None:
                whole.add((h, w))
    assert whole == {(128, 80), (80, 128)}  # both orientations, padded at the bottom or the right


def test_decoding_a_window_with_its_positional_encodings_matches_the_whole_grid():
    seg = Segmenter.new("compact", seed=0)
    torch.manual_seed(0)
    feats = torch.randn(2, 64, 16, 16)
    pts = torch.tensor([[[40.0, 50.0]], [[100.0, 20.0]]])
    lab = torch.ones(2, 1, dtype=torch.int64)
    with torch.no_grad():
        a = seg.decode(feats, pts, lab, None, None, True)
        b = seg.decode(feats, pts, lab, None, None, True, pe=seg.net.dense_pe().expand(2, -1, -1, -1))
        # a window: the decoder sees 8x8 cells and their own encodings
        win = seg.decode(feats[..., 4:12, 8:16], pts, lab, None, None, True,
                         pe=seg.net.dense_pe()[..., 4:12, 8:16].expand(2, -1, -1, -1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert win[0].shape == (2, 3, 32, 32)


def _two_clock_worker(rank: int, port: int, out: str) -> None:
    import time as _time

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    images, masks = small_data(2)
    inner = dataset_sampler(images, masks)

    def slow(rng):  # rank 1 sleeps: its CPU clock barely moves while rank 0's wall clock runs out
        if rank == 1:
            _time.sleep(0.05)
        return inner(rng)

    # Different clocks on purpose: on its own, rank 1 would want many more steps than rank 0.
    settings = TrainSettings(minutes=2.0 / 60, clock="wall" if rank == 0 else "cpu", batch_images=1,
                             masks_per_image=1, crop_batch_images=2, seed=rank)
    res = train(Segmenter.new("compact", seed=0), slow, settings)
    with open(f"{out}.{rank}", "w") as f:
        f.write(str(res.steps))
    dist.destroy_process_group()


def test_data_parallel_workers_stop_together_on_rank_0s_clock(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_two_clock_worker, args=(r, port, str(tmp_path / "steps"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(alive), "a worker hung waiting for the other"
    assert [p.exitcode for p in procs] == [0, 0]
    steps = [int((tmp_path / f"steps.{r}").read_text()) for r in range(2)]
    assert steps[0] == steps[1] >= 1


def test_a_round_fine_tunes_a_trained_model_at_the_fine_tune_rate(tmp_path):
    """A fresh model trains at the recipe's from-scratch rate; a trained one (steps in its history) at
    FINE_TUNE_LR; `train.lr` overrides both; the history's step count carries from round to round."""
    import yaml

    from engine.integrations.config import load_config
    from engine.retrain import FINE_TUNE_LR
    from engine.rounds import default_bootstrap, default_init_model
    from model.checkpoints import trained_steps

    (tmp_path / "images").mkdir()
    data = {"workdir": str(tmp_path / "run"), "images": {"source": str(tmp_path / "images")},
            "model": {"bootstrap_steps": 2, "bootstrap_images": 2, "bootstrap_image_size": 64},
            "train": {"use_ray": False, "steps": 2}}
    (tmp_path / "engine.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "engine.yaml")
    init = default_init_model(cfg, str(tmp_path / "r0-init"))["checkpoint"]
    assert trained_steps(init) == 0

    def round_from(start: str, out: str) -> dict:
        default_bootstrap(cfg, start, str(tmp_path / out))
        return json.loads((tmp_path / out / "sa_engine.json").read_text())["metadata"]

    first = round_from(init, "a")
    assert first["lr"] == TrainSettings().lr and first["steps_before"] == 0 and trained_steps(tmp_path / "a") == 2
    second = round_from(str(tmp_path / "a"), "b")
    assert second["lr"] == FINE_TUNE_LR < TrainSettings().lr and trained_steps(tmp_path / "b") == 4
    cfg.train.lr = 1e-4
    assert round_from(str(tmp_path / "b"), "c")["lr"] == 1e-4
    assert trained_steps(tmp_path / "nowhere") is None  # not ours: real weights of unknown history


def test_train_keys_reach_a_rounds_settings():
    from engine.integrations.config import load_config
    from engine.retrain import round_settings

    default, _ = round_settings(load_config(None), None, 2)
    assert default.iterations == TrainSettings().iterations and default.seed == 2
    cfg = load_config(None, {"train.prompts_per_mask": 6, "train.lr": 1e-3, "train.steps": 9})
    settings, steps = round_settings(cfg, None, 1)
    assert (settings.iterations, settings.lr, settings.max_steps, steps) == (6, 1e-3, 9, 0)


def test_the_trainer_learns_to_segment_what_it_was_shown(fitted_compact):
    """Issue 31.14: the shared 120-step model answers a click on each object of its scenes far better than the
    same network untrained (a flipped loss, a frozen optimiser or a wrong target fails here, not only in a
    slow test elsewhere)."""
    from model.evaluate import click_eval

    trained, scenes = fitted_compact
    fresh = Segmenter.new("compact", seed=0)
    images, masks = [s[0] for s in scenes], [s[1] for s in scenes]
    after = click_eval(trained, images, masks, clicks=1)["oracle@1"]
    before = click_eval(fresh, images, masks, clicks=1)["oracle@1"]
    assert after >= before + 0.15, (before, after)  # measured: 0.30 against 0.02


def test_a_wall_clock_guard_that_stops_training_early_is_reported(tmp_path):
    """Issue 30: budgets are steps; a wall-clock guard that stops training first leaves `short`, `stopped_by`
    "minutes" and, through a round (here the bootstrap), one line naming the steps trained and planned."""
    import yaml

    from engine.integrations.config import load_config
    from engine.rounds import default_bootstrap, default_init_model

    images, masks = small_data()
    res = train(Segmenter.new("compact", seed=0), dataset_sampler(images, masks),
                TrainSettings(max_steps=100_000, minutes=0.005, batch_images=1, masks_per_image=1))
    assert res.short and res.stopped_by == "minutes" and 1 <= res.steps < 100_000 and res.planned_steps == 100_000
    full = train(Segmenter.new("compact", seed=0), dataset_sampler(images, masks),
                 TrainSettings(max_steps=2, batch_images=1, masks_per_image=1))
    assert not full.short and full.stopped_by == "steps" and full.steps == 2

    (tmp_path / "images").mkdir()
    data = {"workdir": str(tmp_path / "run"), "images": {"source": str(tmp_path / "images")},
            "model": {"bootstrap_steps": 100_000, "bootstrap_minutes": 0.005, "bootstrap_images": 2,
                      "bootstrap_image_size": 64}, "train": {"use_ray": False}}
    (tmp_path / "engine.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "engine.yaml")
    init = default_init_model(cfg, str(tmp_path / "r0-init"))["checkpoint"]
    out = default_bootstrap(cfg, init, str(tmp_path / "boot"))
    assert out["short"] and out["planned_steps"] == 100_000 and out["steps"] < 100_000
    assert out["note"].startswith(f"trained {out['steps']} of 100000 steps") and "model.bootstrap_minutes" in out["note"]
