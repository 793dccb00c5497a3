import io

import numpy as np
import pytest
from PIL import Image

from storage.images import BadImage, ImageSource, decode_image, fit_max_side, image_id_from_key
from storage.quarantine import Quarantine


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RGB = np.zeros((20, 30, 3), np.uint8)
RGB[:5, :10] = [200, 10, 20]


def test_rgb_png_and_grayscale():
    assert np.array_equal(decode_image(png_bytes(Image.fromarray(RGB)), "x"), RGB)
    grey = decode_image(png_bytes(Image.fromarray(RGB[..., 0])), "x")
    assert grey.shape == (20, 30, 3) and np.array_equal(grey[..., 1], RGB[..., 0])
    binary = decode_image(png_bytes(Image.fromarray(RGB[..., 0] > 0)), "x")
    assert set(np.unique(binary)) == {0, 255}


def test_sixteen_bit_grey_maps_full_range_to_eight_bits():
    values = np.array([[0, 257, 65535, 32896]], np.uint16)
    out = decode_image(png_bytes(Image.fromarray(values)), "x", high_bit_depth="range")
    assert out.dtype == np.uint8 and out[0, :, 0].tolist() == [0, 1, 255, 128]


def test_twelve_bit_in_sixteen_and_float_tiffs_stay_visible_by_percentile():
    rng = np.random.default_rng(0)
    twelve = np.zeros((40, 50), np.uint16)
    twelve[10:30, 10:30] = 235  # a microscopy-like object: values 0..235 in a 16-bit container
    twelve += rng.integers(0, 20, twelve.shape).astype(np.uint16)
    twelve[39, 49] = 4095  # one hot pixel: a min..max stretch would leave the object dark
    tiff = png_bytes(Image.fromarray(twelve), "TIFF")
    out = decode_image(tiff, "x.tif")  # default: percentile
    assert out[20, 20, 0] >= 200 and out[0, 0, 0] <= 60  # object bright, background dark
    assert decode_image(tiff, "x.tif", high_bit_depth="range")[20, 20, 0] <= 1  # the old mapping: black
    f = (twelve.astype(np.float32) / 1000.0 - 0.1)  # a float TIFF with negative values (and the hot pixel)
    out_f = decode_image(png_bytes(Image.fromarray(f, mode="F"), "TIFF"), "f.tif")
    assert out_f[20, 20, 0] >= 200 and out_f[0, 0, 0] <= 60
    nan = f.copy()
    nan[0, :] = np.nan  # NaNs do not poison the stretch
    assert decode_image(png_bytes(Image.fromarray(nan, mode="F"), "TIFF"), "n.tif")[20, 20, 0] >= 200
    flat = decode_image(png_bytes(Image.fromarray(np.full((4, 4), 700, np.uint16)), "TIFF"), "flat.tif")
    assert flat.shape == (4, 4, 3) and flat.dtype == np.uint8
    with pytest.raises(ValueError, match="high_bit_depth"):
        decode_image(tiff, "x.tif", high_bit_depth="gamma")


def test_alpha_is_composited_over_white_and_palette_converted():
    rgba = np.dstack([RGB, np.full((20, 30), 255, np.uint8)])
    rgba[-1, -1, 3] = 0  # fully transparent pixel
    out = decode_image(png_bytes(Image.fromarray(rgba, "RGBA")), "x")
    assert out[0, 0].tolist() == [200, 10, 20] and out[-1, -1].tolist() == [255, 255, 255]
    la = Image.fromarray(np.dstack([RGB[..., 0], np.full((20, 30), 255, np.uint8)]), "LA")
    assert decode_image(png_bytes(la), "x")[0, 0].tolist() == [200, 200, 200]
    palette = Image.fromarray(RGB).convert("P", palette=Image.ADAPTIVE, colors=4)
    assert np.array_equal(decode_image(png_bytes(palette, "GIF"), "x"), RGB)


def test_exif_orientation_is_applied():
    img = Image.fromarray(RGB)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = decode_image(png_bytes(img, "JPEG", exif=exif, quality=95), "x")
    assert out.shape == (30, 20, 3)
    # the red block (top-left, 5x10) ends up in the top-right corner, 10 tall and 5 wide
    assert out[:10, -5:, 0].mean() > 150 and out[:10, :5, 0].mean() < 50


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file (0 bytes)"),
    (b"this is text, not an image", "not an image"),
    (png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
               "JPEG")[:600], "truncated or corrupt"),
    (png_bytes(Image.new("1", (20000, 20000))), "decompression bomb"),
])
def test_bad_images_raise_one_line_reasons(data, reason):
    with pytest.raises(BadImage) as e:
        decode_image(data, "s3://b/img.jpg")
    message = str(e.value)
    assert message.startswith("s3://b/img.jpg: ") and reason in message and "\n" not in message


def test_pixel_limit_is_configurable():
    with pytest.raises(BadImage, match="exceeds the 100 pixel limit"):
        decode_image(png_bytes(Image.fromarray(RGB)), "x", max_pixels=100)


def test_fit_max_side():
    big = np.zeros((300, 1000, 3), np.uint8)
    small, scale = fit_max_side(big, 500)
    assert small.shape == (150, 500, 3) and scale == 0.5
    same, scale = fit_max_side(big, 1000)
    assert same is big and scale == 1.0


def make_folder(root):
    (root / "sub").mkdir(parents=True)
    Image.fromarray(RGB).save(root / "b.png")
    Image.fromarray(np.zeros((100, 400, 3), np.uint8)).save(root / "sub" / "a_large.png")
    (root / "c_zero.jpg").write_bytes(b"")
    (root / "d_text.jpg").write_text("not an image")
    (root / "notes.txt").write_text("not listed: not an image extension")
    (root / "annotations.json").write_text("{}")


def test_source_lists_sorted_stable_ids_and_downscales(tmp_path):
    make_folder(tmp_path / "imgs")
    src = ImageSource(str(tmp_path / "imgs"), max_side=200)
    refs = src.list()
    assert [r.image_id for r in refs] == ["b.png", "c_zero.jpg", "d_text.jpg", "sub/a_large.png"]
    assert refs[0].uri == str(tmp_path / "imgs" / "b.png")
    assert image_id_from_key("sub/a_large.png") == "sub/a_large.png"
    large = src.load(refs[-1])
    assert large.pixels.shape == (50, 200, 3) and large.original_size == (100, 400) and large.scale == 0.5
    assert src.load(src.ref("b.png")).scale == 1.0


def test_load_many_quarantines_bad_files_and_goes_on(tmp_path):
    make_folder(tmp_path / "imgs")
    src = ImageSource(str(tmp_path / "imgs"), max_side=200, large_images="quarantine")
    quarantine = Quarantine(str(tmp_path / "store"))
    loaded = list(src.load_many(src.list(), quarantine, stage="auto"))
    assert [im.image_id for im in loaded] == ["b.png"]
    entries = quarantine.entries()
    assert [(e["thing"].split("/imgs/")[1], e["stage"]) for e in entries] == [
        ("c_zero.jpg", "auto"), ("d_text.jpg", "auto"), ("sub/a_large.png", "auto")]
    assert entries[0]["reason"] == "empty file (0 bytes)"
    assert "larger than max_side=200" in entries[2]["reason"]
    # a second worker (e.g. a re-run) adds its own file; the same thing/reason/stage is listed once
    again = Quarantine(str(tmp_path / "store"))
    list(src.load_many(src.list(), again, stage="auto"))
    assert len(again.entries()) == 3
    assert len(list((tmp_path / "store" / "quarantine").glob("*.jsonl"))) == 2
    # the empty file may be a copy in progress (transient): a rerun tries it again; the others are held
    assert [e["kind"] for e in again.entries()] == ["transient", "permanent", "permanent"]
    assert again.things("auto") == {entries[1]["thing"], entries[2]["thing"]} and again.things("manual") == set()
    assert again.retrying("auto") == {entries[0]["thing"]}


def test_missing_file_is_a_bad_image(tmp_path):
    src = ImageSource(str(tmp_path))
    with pytest.raises(BadImage, match="gone.png: not found"):
        src.load(src.ref("gone.png"))


def test_invalid_large_image_policy(tmp_path):
    with pytest.raises(ValueError, match="large_images"):
        ImageSource(str(tmp_path), large_images="crop")


@pytest.mark.parametrize("ext", ["tif", "png"])
def test_twelve_bit_colour_in_sixteen_bits_is_stretched_like_grey(tmp_path, ext):
    """Issue 31.9: 12-bit data in a 16-bit RGB TIFF or PNG (written by OpenCV, as a camera SDK would) decodes to
    visible 8-bit colour with its hues kept: a red object stays red and bright, the background mid-grey. PIL
    alone keeps the high byte (values 0..15)."""
    import cv2

    rgb = np.full((40, 50, 3), 1000, np.uint16)
    rgb[10:30, 10:30] = (3800, 300, 300)  # a red object
    rgb += np.random.default_rng(1).integers(0, 40, rgb.shape).astype(np.uint16)
    path = tmp_path / f"deep.{ext}"
    assert cv2.imwrite(str(path), rgb[..., ::-1])
    out = decode_image(path.read_bytes(), path.name)
    assert out.dtype == np.uint8 and out.max() >= 250
    r, g, b = out[20, 20].tolist()
    assert r >= 230 and g <= 40 and b <= 40  # red, bright
    assert 40 <= out[2, 2, 0] <= 120 and abs(int(out[2, 2, 0]) - int(out[2, 2, 2])) <= 12  # background grey
    assert decode_image(path.read_bytes(), path.name, high_bit_depth="range")[20, 20, 0] == round(
        int(rgb[20, 20, 0]) / 65535 * 255)


def test_links_that_will_fail_again_are_permanent(tmp_path):
    """Issue 31.8: a symbolic link loop and a dangling link are permanent (a retry meets the same link); a
    missing file stays transient (a copy may be on its way)."""
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    src = ImageSource(str(tmp_path))
    for name, reason in (("loop.png", "symbolic link loop"), ("dangling.png", "dangling symbolic link")):
        with pytest.raises(BadImage, match=reason) as e:
            src.load(src.ref(name))
        assert e.value.kind == "permanent"
    with pytest.raises(BadImage) as e:
        src.load(src.ref("gone.png"))
    assert e.value.kind == "transient"


def test_a_very_thin_image_is_not_a_transient_failure():
    """Issue 31.8: a 3x20000 image (1x1500 for the model) used to fail in the encoder's resize ('Input and
    output sizes should be greater than 0') and be retried as transient; it now runs, and a model failure that
    is not out of memory is permanent."""
    from model.amg import generate_with_fallback
    from model.amg_params import AmgParams
    from model.segmenter import Segmenter, failure_kind

    pixels = decode_image(png_bytes(Image.fromarray(np.full((3, 20000, 3), 128, np.uint8))), "thin.png")
    small, scale = fit_max_side(pixels, 1500)
    masks, _ = generate_with_fallback(Segmenter.new("compact"), small, AmgParams(points_per_side=4),
                                      output_size=pixels.shape[:2])
    assert all(m.rle["size"] == [3, 20000] for m in masks)
    assert failure_kind(RuntimeError("Input and output sizes should be greater than 0")) == "permanent"
    assert failure_kind(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "transient"
    assert failure_kind(MemoryError()) == "transient"
