import numpy as np
import pytest
from PIL import Image

from uflow.errors import UFlowError
from uflow.images import list_images, read_image, resolve_inputs


def test_gray_16bit_palette_and_opaque_rgba_convert_exactly(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (8, 8, 3) and np.allclose(out[:, :, 1], gray / 255.0)

    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert np.allclose(out[:, :, 0], deep / 65535.0, atol=1e-6), "16-bit must be scaled by its full range, not clipped"

    rgba = np.dstack([np.full((8, 8, 3), 100, np.uint8), np.full((8, 8), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.allclose(read_image(tmp_path / "a.png"), 100 / 255.0)

    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (8, 8, 3)


def test_transparent_truncated_and_non_images_are_refused_naming_the_file(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    with pytest.raises(UFlowError, match=r"t\.png: image has transparent pixels"):
        read_image(tmp_path / "t.png")

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UFlowError, match=r"cut\.png: cannot read image"):
        read_image(tmp_path / "cut.png")

    (tmp_path / "fake.png").write_text("hello")
    with pytest.raises(UFlowError, match=r"fake\.png: cannot read image"):
        read_image(tmp_path / "fake.png")


def test_empty_and_missing_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UFlowError, match="contains no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(UFlowError, match="no such"):
        resolve_inputs([str(tmp_path / "nowhere")])
    with pytest.raises(UFlowError, match="matches no images"):
        resolve_inputs([str(tmp_path / "*.png")])


def test_inputs_expand_folders_recursively_and_globs(tmp_path):
    for sub in ("a", "b/c"):
        (tmp_path / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / sub / "000.png")
    found = resolve_inputs([str(tmp_path)])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/000.png", "b/c/000.png"]
    assert resolve_inputs([str(tmp_path / "*" / "*.png"), str(tmp_path / "a" / "000.png")]) == [tmp_path / "a" / "000.png"]


def test_every_mode_pillow_converts_is_read(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=100)
    out = read_image(tmp_path / "c.jpg")
    expected = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"), np.float32) / 255
    assert out.shape == (16, 16, 3) and np.array_equal(out, expected), "CMYK goes through Pillow's conversion"

    Image.fromarray(rgb).convert("YCbCr").save(tmp_path / "y.jpg")
    assert read_image(tmp_path / "y.jpg").shape == (16, 16, 3)

    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, "F").save(tmp_path / "f.tif")
    assert np.allclose(read_image(tmp_path / "f.tif")[:, :, 0], ramp)
    Image.fromarray(ramp * 1000, "F").save(tmp_path / "big.tif")
    with pytest.raises(UFlowError, match=r"big\.tif: floating-point image with values outside"):
        read_image(tmp_path / "big.tif")


def test_encoded_bytes_are_read_like_files(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "g.png")
    data = (tmp_path / "g.png").read_bytes()
    assert np.array_equal(read_image(data, name="upload"), read_image(tmp_path / "g.png"))
    with pytest.raises(UFlowError, match="^upload: empty file$"):
        read_image(b"", name="upload")
    with pytest.raises(UFlowError, match=r"^upload: cannot read image \(not an image"):
        read_image(b"plain text", name="upload")
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "n.png")
    whole = (tmp_path / "n.png").read_bytes()
    with pytest.raises(UFlowError, match=r"^upload: cannot read image \(file is truncated"):
        read_image(whole[: len(whole) // 2], name="upload")
