"""SAM 3 concept prompts: a noun phrase -> every instance, through the concept stage into the store and exports.

A tiny random-weight transformers `Sam3Model` with a small word-level tokenizer stands in for real SAM 3 weights
(which cannot be downloaded here): it tests the plumbing, not the masks' quality.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from model.checkpoints import CheckpointError
from model.concept import ConceptSegmenter

REPO = Path(__file__).resolve().parents[1]
WORDS = ("disc", "square", "red", "blue", "bottle", "cat")


def tiny_sam3_dir(path: Path) -> Path:
    """A transformers SAM 3 directory (config, weights, tokenizer files) of a ~0.8 M-parameter random model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Sam3Config, Sam3Model

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    small = dict(num_layers=1, num_attention_heads=2, intermediate_size=128, hidden_size=64)
    cfg = Sam3Config(
        vision_config=dict(backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, image_size=224,
                                                patch_size=14, window_size=8, global_attn_indexes=[1],
                                                pretrain_image_size=224), fpn_hidden_size=64),
        text_config=dict(model_type="clip_text_model", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         projection_dim=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0),
        geometry_encoder_config=dict(small), detr_encoder_config=dict(small),
        detr_decoder_config=dict(small, num_queries=12), mask_decoder_config=dict(hidden_size=64, num_attention_heads=2))
    torch.manual_seed(0)
    Sam3Model(cfg).eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory):
    return tiny_sam3_dir(tmp_path_factory.mktemp("sam3") / "sam3-tiny")


def test_segment_is_the_models_answer_post_processed(sam3_dir):
    """`segment` = Sam3Model's forward on the same pixels and tokens, post-processed as transformers'
    `post_process_instance_segmentation` documents it (score = sigmoid(logit) x sigmoid(presence), masks
    resized bilinearly, sigmoid > mask_thresh). Breakage: a lost presence term, or masks not resized."""
    seg = ConceptSegmenter.load(sam3_dir)
    assert seg.model_version.startswith("sam3-hf-")
    img = np.random.default_rng(0).integers(0, 255, (150, 200, 3)).astype(np.uint8)
    emb = seg.embed(img)
    got = seg.segment(emb, "red disc", score_thresh=0.0, mask_thresh=0.5)
    x = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255, (224, 224),
                                       mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        out = seg.model(pixel_values=(x - 0.5) / 0.5, **seg.tokens("red disc"))
    scores = out.pred_logits[0].sigmoid() * out.presence_logits[0].sigmoid()
    order = scores.argsort(descending=True)
    masks = torch.nn.functional.interpolate(out.pred_masks[0][None], (150, 200), mode="bilinear",
                                            align_corners=False)[0].sigmoid() > 0.5
    want = [(float(scores[i]), masks[i].numpy()) for i in order.tolist() if masks[i].any()]
    assert len(got) == len(want) > 0
    for g, (s, m) in zip(got, want):
        assert abs(g.score - s) < 1e-5 and g.mask.shape == (150, 200)
        assert (g.mask == m).mean() >= 0.999
    assert seg.segment(emb, "red disc", score_thresh=1.0) == []


def test_a_non_sam3_directory_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "sam2"}')
    with pytest.raises(CheckpointError) as e:
        ConceptSegmenter.load(tmp_path / "m")
    assert "\n" not in str(e.value) and "model_type 'sam3'" in str(e.value)


def _config(tmp: Path, sam3: Path, n_images: int = 3) -> Path:
    from engine.integrations.synth import write_synthetic_dataset

    write_synthetic_dataset(tmp / "data", n_images=n_images, seed=0, size=96)
    cfg = {"workdir": str(tmp / "run"), "images": {"source": str(tmp / "data" / "images")},
           "storage": {"root": str(tmp / "run" / "store")}, "ray": {"num_cpus": 2, "cpus_per_actor": 0.5},
           "stages": {"concept": {"checkpoint": str(sam3), "score_thresh": 0.0, "max_instances": 3,
                                  "images_per_commit": 2}}}
    path = tmp / "engine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.ray
def test_the_concept_stage_writes_phrases_resumes_and_exports(ray_cluster, sam3_dir, tmp_path):
    from engine.integrations.config import load_config
    from stages.concept import run_concept_stage
    from storage.exports import export_coco, export_sa1b
    from storage.shards import MaskStore

    cfg = load_config(_config(tmp_path, sam3_dir))
    first = run_concept_stage(cfg, ["red disc", "blue square"])
    assert first.images == 3 and first.quarantined == 0 and first.masks == 3 * 2 * 3
    store = MaskStore(cfg.path(cfg.storage.root))
    rows = store.read_table(columns=["image_id", "prompt_text", "stage", "origin", "model_version", "predicted_iou"],
                            stage="concept").to_pylist()
    assert {r["prompt_text"] for r in rows} == {"red disc", "blue square"}
    assert {(r["stage"], r["origin"]) for r in rows} == {("concept", "concept")}
    assert {r["model_version"] for r in rows} == {first.model_version}
    # the same list again: nothing to do; one phrase more: only that phrase runs, nothing is written twice
    again = run_concept_stage(cfg, ["red disc", "blue square"])
    assert again.images == 0 and again.already_done == 3
    more = run_concept_stage(cfg, ["red disc", "blue square", "cat"])
    assert more.images == 3 and more.masks == 3 * 3 and more.masks_per_phrase["cat"] == 9
    ids = store.read_table(columns=["mask_id"], stage="concept").column("mask_id").to_pylist()
    assert len(ids) == len(set(ids)) == 27
    # COCO: one category per phrase; SA-1B: the phrase on each annotation
    coco = export_coco(store, str(tmp_path / "coco"))
    doc = json.loads((tmp_path / "coco" / "instances_all.json").read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    assert set(names.values()) == {"object", "red disc", "blue square", "cat"} and coco["masks"] == 27
    by_name = {}
    for a in doc["annotations"]:
        by_name[names[a["category_id"]]] = by_name.get(names[a["category_id"]], 0) + 1
    assert by_name == {"red disc": 9, "blue square": 9, "cat": 9}
    from engine.integrations import runtime

    export_sa1b(store, str(tmp_path / "sa1b"), runtime.image_source(cfg))
    import tarfile

    with tarfile.open(next((tmp_path / "sa1b").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        anns = json.load(tar.extractfile(member))["annotations"]
    assert {a["prompt_text"] for a in anns} == {"red disc", "blue square", "cat"}


@pytest.mark.parametrize("version", [1, 2])
def test_shards_of_older_schema_versions_still_read(tmp_path, monkeypatch, version):
    """A shard written before `prompt_text` (schema version 1) or the verifier's columns (version 2) existed — the
    writer of that version stood in for by dropping the columns — reads with them null, through the manifest's
    own checks."""
    later = {1: ["prompt_text", "verifier_version", "verifier_score"], 2: ["verifier_version", "verifier_score"]}
    import storage.shards as shards
    from storage.records import MASK_SCHEMA, MaskRecord, make_mask_id, records_to_table

    def v1_table(records):
        t = records_to_table(records)
        return t.drop_columns(later[version]).replace_schema_metadata(
            {b"sa_engine_schema_version": str(version).encode()})

    monkeypatch.setattr(shards, "records_to_table", v1_table)
    monkeypatch.setattr(shards, "SCHEMA_VERSION", version)
    store = shards.MaskStore(str(tmp_path / "store"))
    rec = MaskRecord(image_id="a.png", mask_id=make_mask_id("a.png", 1), height=4, width=4,
                     rle={"size": [4, 4], "counts": b"04<0"}, area=4, bbox=[0, 0, 1, 4], stage="auto", round=0,
                     model_version="m")
    with store.writer("auto", 0, "m") as w:
        w.add([rec])
        w.image_done("a.png", 1)
    monkeypatch.undo()
    (shard,) = store.shards()
    path = next((tmp_path / "store").rglob(Path(shard.path).name))
    old = pq.read_schema(path)
    assert not set(later[version]) & set(old.names) and set(later[version]) <= set(MASK_SCHEMA.names)
    assert old.metadata[b"sa_engine_schema_version"] == str(version).encode()
    store = shards.MaskStore(str(tmp_path / "store"))
    back = list(store.iter_records())
    assert len(back) == 1 and back[0].prompt_text is None and back[0].mask_id == rec.mask_id
    assert back[0].verifier_version is None and back[0].verifier_score is None
    table = store.read_table(columns=["mask_id", *later[version]])
    assert all(table.column(c).to_pylist() == [None] for c in later[version])


def test_stage_concept_command_checks_before_it_starts(tmp_path, sam3_dir):
    """A missing phrase file or checkpoint is one line and exit 2, with nothing started."""
    cfg = _config(tmp_path, sam3_dir, n_images=1)
    cmd = [sys.executable, "-m", "engine.cli", "stage", "concept", "--config", str(cfg), "--phrases",
           str(tmp_path / "missing.txt")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing.txt" in r.stderr + r.stdout
    doc = yaml.safe_load(cfg.read_text())
    doc["stages"]["concept"]["checkpoint"] = str(tmp_path / "nowhere")
    cfg.write_text(yaml.safe_dump(doc))
    (tmp_path / "p.txt").write_text("red disc\n")
    r = subprocess.run(cmd[:-1] + [str(tmp_path / "p.txt")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "stages.concept.checkpoint" in r.stderr + r.stdout
    assert not (tmp_path / "run" / "store").exists()


def text_context(phrase: str, height: int, width: int) -> dict:
    """Interactive context as Label Studio's editor sends it for a smart TextArea."""
    from engine.integrations.labelstudio import CONCEPT_TAG, IMAGE_TAG

    return {"result": [{"type": "textarea", "from_name": CONCEPT_TAG, "to_name": IMAGE_TAG,
                        "original_width": width, "original_height": height, "value": {"text": [phrase]}}]}


@pytest.mark.labelstudio
def test_label_studio_text_prompt_gets_every_instance_as_brush_regions(sam3_dir, tmp_path, labelstudio_server):
    """Through the real Label Studio: a project with the concept TextArea, our backend registered, a typed
    phrase -> one brush region per instance SAM 3 finds, equal to `ConceptSegmenter.segment`'s masks.
    A text prompt to a backend without a SAM 3 model is a 400 naming the setting."""
    from PIL import Image

    from engine.integrations.labelstudio import LabelStudio, LabelStudioError, TaskImage, labeling_config
    from engine.integrations.ml_backend import (BASIC_USER, BackendState, ConceptPredictor, EmbeddingCache,
                                                MaskPredictor, MLBackend, source_image_loader)
    from model.segmenter import Segmenter
    from storage.brush_rle import decode_mask
    from storage.images import ImageSource

    folder = tmp_path / "images"
    folder.mkdir()
    px = np.random.default_rng(1).integers(0, 255, (60, 80, 3)).astype(np.uint8)
    Image.fromarray(px).save(folder / "im0.png")
    source = ImageSource(str(folder))
    concept = ConceptSegmenter.load(sam3_dir)
    seg = Segmenter.new("compact")
    ls: LabelStudio = labelstudio_server.client
    assert "TextArea" in labeling_config(concept=True) and "TextArea" not in labeling_config()
    for with_concept in (True, False):
        state = BackendState(MaskPredictor(seg, EmbeddingCache(seg)), "concept-token", None,
                             concept=ConceptPredictor(concept, score_thresh=0.0, max_instances=5) if with_concept else None)
        state.image_loader = source_image_loader(source, state=state)
        pid = ls.ensure_project(f"concept prompts {with_concept}", concept=True)
        try:
            ls.add_local_storage(pid, str(folder))
            im = TaskImage("im0.png", LabelStudio.local_file_url(source.ref("im0.png").uri,
                                                                 labelstudio_server.document_root), 60, 80)
            task_id = ls.import_tasks(pid, [im])["im0.png"]
            with MLBackend(state) as backend:
                backend_id = ls.connect_ml_backend(pid, backend.url, BASIC_USER, "concept-token")
                if not with_concept:
                    with pytest.raises(LabelStudioError, match="422"):  # understood, and not answerable here
                        ls.predict_interactive(backend_id, task_id, text_context("red disc", 60, 80))
                    assert "stages.concept.checkpoint" in (state.last_error or "")  # what the backend logged
                    continue
                answer = ls.predict_interactive(backend_id, task_id, text_context("red disc", 60, 80))
            want = concept.segment(concept.embed(px), "red disc", score_thresh=0.0, max_instances=5)
            assert answer["model_version"] == concept.model_version and len(answer["result"]) == len(want) > 0
            for region, m in zip(answer["result"], want):
                assert region["type"] == "brushlabels"
                assert np.array_equal(decode_mask(region["value"]["rle"], 60, 80), m.mask)
        finally:
            ls.delete_project(pid)


@pytest.mark.ray
def test_the_concept_stage_sets_aside_and_releases_as_the_automatic_stage_does(ray_cluster, sam3_dir, tmp_path):
    """One driver for every Ray stage (engine/integrations/stage_kit.py): a half-copied file is set aside as "bad"
    and transient, and the rerun after the copy finished does it and releases it from the quarantine (the concept
    stage's own loop never released it and called every failure "bad")."""
    from engine.integrations.config import load_config
    from stages.concept import run_concept_stage
    from storage.quarantine import Quarantine

    cfg = load_config(_config(tmp_path, sam3_dir))
    late = sorted((tmp_path / "data" / "images").glob("*.png"))[1]
    content = late.read_bytes()
    late.write_bytes(b"")  # the copy has only just begun
    first = run_concept_stage(cfg, ["red disc"])
    assert first.images == 2 and first.quarantined == 1
    [entry] = Quarantine(cfg.path(cfg.storage.root)).entries()
    assert entry["kind"] == "transient" and not entry["held"]
    late.write_bytes(content)
    second = run_concept_stage(cfg, ["red disc"])
    assert second.images == 1 and second.retried == 1 and second.already_done == 2
    assert Quarantine(cfg.path(cfg.storage.root)).entries() == []  # done now: it left the quarantine


def test_one_vocabulary_for_images_set_aside():
    """stage_kit.outcome_of: an unusable image is "bad" with its own kind, a model failure "failed" (transient only
    when memory ran out)."""
    from engine.integrations.stage_kit import outcome_of
    from storage.images import BadImage

    assert outcome_of(BadImage("a.png: empty file", transient=True))[::2] == ("bad", "transient")
    assert outcome_of(BadImage("b.png: not an image"))[::2] == ("bad", "permanent")
    status, reason, kind = outcome_of(RuntimeError("shape mismatch\nmore"))
    assert (status, kind) == ("failed", "permanent") and reason.endswith("RuntimeError: shape mismatch")
    assert outcome_of(MemoryError())[::2] == ("failed", "transient")
