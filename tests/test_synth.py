import json

import numpy as np
from pycocotools.coco import COCO
from typer.testing import CliRunner

from engine.integrations.synth import image_file_name, make_scene, scene_rng, write_synthetic_dataset
from storage.rle import decode_rles


def test_scene_shapes_counts_and_part_structure():
    n_with_parts = 0
    object_counts = []
    for i in range(40):
        image, masks, parents = make_scene(scene_rng(1, i), 128)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert masks.dtype == bool and masks.shape[1:] == (128, 128) and len(parents) == len(masks)
        assert masks.reshape(len(masks), -1).any(axis=1).all(), "every mask is non-empty"
        objects = [k for k, p in enumerate(parents) if p is None]
        object_counts.append(len(objects))
        assert 2 <= len(objects) <= 12
        # visible parts of different objects never overlap (occlusion: the front one wins)
        stacked = masks[objects].sum(axis=0)
        assert stacked.max() <= 1
        for k in objects:
            parts = [j for j, p in enumerate(parents) if p == k]
            if parts:
                n_with_parts += 1
                assert 2 <= len(parts) <= 3
                assert all(j > k for j in parts)
                assert np.array_equal(np.logical_or.reduce(masks[parts]), masks[k])
                assert masks[parts].sum(axis=0).max() == 1, "parts of one object are disjoint"
    assert n_with_parts >= 10, "objects made of parts are common"
    assert len(set(object_counts)) >= 5, "object counts vary"


def test_scenes_are_textured_and_objects_differ_from_background():
    image, masks, parents = make_scene(scene_rng(2, 3), 128)
    background = ~np.logical_or.reduce(masks)
    assert image[background].std(axis=0).min() > 3, "background is textured, not flat"
    for k, p in enumerate(parents):
        if p is None and masks[k].sum() > 50:
            assert image[masks[k]].std() > 1, "objects carry noise/texture"


def test_determinism_and_split_by_seed():
    a = make_scene(scene_rng(0, 4), 96)
    b = make_scene(scene_rng(0, 4), 96)
    c = make_scene(scene_rng(1, 4), 96)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert image_file_name(0, 4) != image_file_name(1, 4)


def test_write_dataset_coco_with_rle_and_parent_id(tmp_path):
    summary = write_synthetic_dataset(tmp_path / "ds", n_images=4, seed=7, size=96)
    assert summary["images"] == 4 and summary["annotations"] == summary["objects"] + summary["parts"]
    coco_json = json.loads((tmp_path / "ds" / "annotations.json").read_text())
    assert coco_json["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    coco = COCO(str(tmp_path / "ds" / "annotations.json"))  # pycocotools accepts it
    assert len(coco.getImgIds()) == 4
    for index, img in enumerate(coco_json["images"]):
        assert (tmp_path / "ds" / "images" / img["file_name"]).is_file()
        image, masks, parents = make_scene(scene_rng(7, index), 96)
        anns = [a for a in coco_json["annotations"] if a["image_id"] == img["id"]]
        assert all(isinstance(a["segmentation"]["counts"], str) for a in anns)
        decoded = decode_rles([a["segmentation"] for a in anns])
        assert np.array_equal(decoded, masks)
        by_id = {a["id"]: a for a in anns}
        for a, parent in zip(anns, parents):
            assert a["area"] == int(decoded[anns.index(a)].sum())
            if parent is None:
                assert a["parent_id"] is None
            else:
                assert by_id[a["parent_id"]] is anns[parent]
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(tmp_path / "ds" / "images" / img["file_name"])), image)


def test_rerun_is_identical_and_safe(tmp_path):
    write_synthetic_dataset(tmp_path, n_images=2, seed=3, size=64)
    first = (tmp_path / "annotations.json").read_bytes()
    pngs = {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir()}
    write_synthetic_dataset(tmp_path, n_images=2, seed=3, size=64)
    assert (tmp_path / "annotations.json").read_bytes() == first
    assert {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir()} == pngs
    assert not [p for p in tmp_path.rglob(".*tmp")], "no temporary files left"


def test_cli_synth(tmp_path):
    from engine.cli import app

    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "cli"), "--images", "2", "--seed", "1",
                                      "--size", "64"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cli" / "images").glob("*.png"))) == 2


def test_pebbles_are_many_small_dull_objects_unlike_shapes(tmp_path):
    """The demo's two families differ as designed: pebbles scenes hold more, smaller objects whose colours sit
    closer to the background's; file names carry the family; an unknown family writes nothing."""
    import pytest

    def stats(family):
        counts, areas, contrast = [], [], []
        for i in range(12):
            image, masks, parents = make_scene(scene_rng(3, i), 128, family)
            objects = [m for m, p in zip(masks, parents) if p is None]
            counts.append(len(objects))
            areas += [m.mean() for m in objects]
            ground = ~np.logical_or.reduce(masks)
            contrast += [np.abs(image[m].mean(0) - image[ground].mean(0)).mean() for m in objects]
        return np.mean(counts), np.median(areas), np.median(contrast)

    shapes, pebbles = stats("shapes"), stats("pebbles")
    assert pebbles[0] > 1.5 * shapes[0] and pebbles[1] < 0.8 * shapes[1] and pebbles[2] < 0.6 * shapes[2]
    summary = write_synthetic_dataset(tmp_path / "p", n_images=1, seed=2, size=64, family="pebbles")
    assert summary["family"] == "pebbles" and (tmp_path / "p" / "images" / "synth-pebbles-s2-00000.png").exists()
    with pytest.raises(ValueError, match="unknown scene family 'rocks'"):
        write_synthetic_dataset(tmp_path / "r", n_images=1, seed=2, size=64, family="rocks")
    assert not (tmp_path / "r" / "annotations.json").exists()
