"""Decoding and collating against an OpenCV reference, on files written by the tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from loader_server.config import ServerConfig
from loader_server.data.index import load_index
from loader_server.pipeline.batch import BatchBuilder
from loader_server.pipeline.decode import DecodeError, Decoder, read_file

from .conftest import write_image

SIZE = (48, 32)  # width, height


def config(**kw: object) -> ServerConfig:
    return ServerConfig(data="unused", size=kw.pop("size", SIZE), workers=1, **kw)  # type: ignore[arg-type]


def decode(path: Path, **kw: object) -> np.ndarray:
    cfg = config(**kw)
    out = np.zeros((cfg.size[1], cfg.size[0], cfg.channels), np.uint8)
    Decoder(cfg).decode_into(read_file(str(path)), str(path), out)
    return out


def reference(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    return cv2.resize(img, SIZE, interpolation=cv2.INTER_LINEAR)


@pytest.fixture
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), (7, 7), 0)
    return img


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp", ".tif"])
def test_color_files_match_opencv_reference_in_rgb(tmp_path: Path, photo: np.ndarray, ext: str) -> None:
    path = write_image(tmp_path / f"p{ext}", photo)
    np.testing.assert_array_equal(decode(path), reference(path)[..., ::-1])
    np.testing.assert_array_equal(decode(path, color="bgr"), reference(path))


def test_pure_red_is_red_in_rgb_order(tmp_path: Path) -> None:
    red_bgr = np.zeros((20, 20, 3), np.uint8)
    red_bgr[..., 2] = 255
    path = write_image(tmp_path / "red.png", red_bgr)
    out = decode(path)
    assert (out[..., 0] == 255).all() and (out[..., 1:] == 0).all()
    assert (decode(path, color="bgr")[..., 2] == 255).all()


def test_grayscale_file_expands_to_three_channels(tmp_path: Path, photo: np.ndarray) -> None:
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    path = write_image(tmp_path / "g.png", gray)
    out = decode(path)
    np.testing.assert_array_equal(out, reference(path)[..., ::-1])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    one = decode(path, color="gray")
    assert one.shape == (SIZE[1], SIZE[0], 1)
    np.testing.assert_array_equal(one[..., 0], reference(path, cv2.IMREAD_GRAYSCALE))


def test_rgba_drops_alpha(tmp_path: Path, photo: np.ndarray) -> None:
    rgba = np.dstack([photo, np.full(photo.shape[:2], 7, np.uint8)])
    path = write_image(tmp_path / "a.png", rgba)
    np.testing.assert_array_equal(decode(path), cv2.resize(photo, SIZE)[..., ::-1])


def test_16_bit_png_scales_to_8_bits(tmp_path: Path, photo: np.ndarray) -> None:
    deep = photo.astype(np.uint16) * 257  # 8-bit value v becomes v * 257, whose top byte is v
    path = write_image(tmp_path / "d.png", deep)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    np.testing.assert_array_equal(decode(path), cv2.resize(photo, SIZE)[..., ::-1])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # white left half
    ok, buf = cv2.imencode(".jpg", img)
    data = bytearray(buf.tobytes())
    # Insert an APP1 EXIF segment with Orientation = 6 (rotate 90 degrees clockwise) after SOI.
    tiff = (b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
            + b"\x00\x00\x00\x00")
    app1 = b"Exif\x00\x00" + tiff
    data[2:2] = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    path = tmp_path / "rot.jpg"
    path.write_bytes(bytes(data))
    decoded = Decoder(config()).decode(bytes(data), str(path))
    assert decoded.shape[:2] == (40, 20)  # upright: the 40x20 image became 20 wide, 40 tall
    assert decoded[:15].mean() > 200 and decoded[25:].mean() < 50  # white half is now on top


def test_letterbox_keeps_aspect_and_pads(tmp_path: Path) -> None:
    img = np.full((10, 40, 3), 200, np.uint8)  # 4:1, target 48x32 = 1.5:1 -> 48x12 band
    path = write_image(tmp_path / "wide.png", img)
    out = decode(path, resize="letterbox", pad_value=9)
    assert (out[:10] == 9).all() and (out[22:] == 9).all()
    assert (out[10:22] == 200).all()


def test_center_crop_takes_the_middle(tmp_path: Path) -> None:
    img = np.zeros((30, 90, 3), np.uint8)
    img[:, 30:60] = 255  # white centre third; crop of a 3:1 image to 1.5:1 keeps the centre 45 px
    path = write_image(tmp_path / "c.png", img)
    out = decode(path, resize="crop", size=(32, 32))
    assert out.shape == (32, 32, 3)
    # The 30x30 centre square is entirely white.
    assert (out == 255).all()


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"this is text, not a JPEG", "not a decodable image"),
     (None, "truncated")],
)
def test_bad_files_raise_decode_error_naming_the_file(
    tmp_path: Path, photo: np.ndarray, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "bad.jpg"
    if content is None:
        ok, buf = cv2.imencode(".jpg", photo)
        content = buf.tobytes()[:200]
    path.write_bytes(content)
    with pytest.raises(DecodeError) as info:
        decode(path)
    assert str(path) in str(info.value)
    assert reason.split()[0] in info.value.reason or reason == "truncated"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="file not found"):
        read_file(str(tmp_path / "gone.jpg"))


def _builder(tmp_path: Path, photo: np.ndarray, **kw: object) -> tuple[BatchBuilder, list[Path]]:
    paths = [write_image(tmp_path / f"{i}.png", np.roll(photo, i * 7, axis=1)) for i in range(3)]
    listfile = tmp_path / "list.txt"
    listfile.write_text("".join(f"{p.name} {i + 10}\n" for i, p in enumerate(paths)))
    cfg = ServerConfig(data=str(listfile), size=SIZE, workers=1, batch_size=3, **kw)  # type: ignore[arg-type]
    return BatchBuilder(cfg, load_index(listfile)), paths


def test_batch_is_written_into_the_given_buffer(tmp_path: Path, photo: np.ndarray) -> None:
    builder, paths = _builder(tmp_path, photo)
    x = builder.allocate()
    arrays = builder.build(np.array([2, 0], np.int64), x)
    assert np.shares_memory(arrays["x"], x) and arrays["x"].shape == (2, SIZE[1], SIZE[0], 3)
    np.testing.assert_array_equal(arrays["x"][0], reference(paths[2])[..., ::-1])
    assert arrays["y"].tolist() == [12, 10] and arrays["y"].dtype == np.int64
    assert arrays["index"].tolist() == [2, 0]


def test_float32_chw_with_mean_std(tmp_path: Path, photo: np.ndarray) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    builder, paths = _builder(tmp_path, photo, dtype="float32", layout="chw", mean=mean, std=std)
    x = builder.allocate()
    out = builder.build(np.array([1], np.int64), x)["x"]
    assert out.dtype == np.float32 and out.shape == (1, 3, SIZE[1], SIZE[0])
    ref = reference(paths[1])[..., ::-1].astype(np.float32) / 255
    ref = ((ref - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-5)


def test_float32_scaled_to_unit_range(tmp_path: Path, photo: np.ndarray) -> None:
    builder, paths = _builder(tmp_path, photo, dtype="float32")
    out = builder.build(np.array([0], np.int64), builder.allocate())["x"]
    np.testing.assert_allclose(out[0], reference(paths[0])[..., ::-1] / 255.0, atol=1e-6)


def test_jpeg_size_reads_the_frame_header(tmp_path: Path, photo: np.ndarray) -> None:
    from loader_server.pipeline.decode import jpeg_size

    ok, buf = cv2.imencode(".jpg", photo)
    assert jpeg_size(buf.tobytes()) == (120, 90)
    ok, png = cv2.imencode(".png", photo)
    assert jpeg_size(png.tobytes()) is None
    assert jpeg_size(b"\xff\xd8\xff") is None and jpeg_size(b"") is None


def test_reduced_decoding_picks_the_largest_safe_factor(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    big = cv2.resize(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), (400, 300), interpolation=cv2.INTER_CUBIC)
    path = write_image(tmp_path / "big.jpg", big)
    decoder = Decoder(config())
    assert decoder.reduction(400, 300) == 4  # 100x75 still covers 48x32 in both orientations
    assert decoder.reduction(120, 90) == 1
    assert Decoder(config(resize="crop", size=(32, 32))).reduction(400, 300) == 8  # 50x37 covers 32x32
    reduced = decode(path)
    exact = decode(path, reduced_decode=False)
    np.testing.assert_array_equal(exact, reference(path)[..., ::-1])
    # Close, not identical: linear 400->48 skips pixels (aliasing), 100->48 after DCT scaling less so.
    assert np.abs(reduced.astype(int) - exact.astype(int)).mean() < 8
    assert decoder.decode(path.read_bytes(), str(path)).shape == (75, 100, 3)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize(("mean", "std"), [(None, None), ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
def test_normalization_matches_the_formula(layout: str, mean: tuple[float, ...] | None,
                                           std: tuple[float, ...] | None) -> None:
    from loader_client.contract.normalize import Normalization

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    m = np.array(mean or (0, 0, 0), np.float64)
    s = np.array(std or (1, 1, 1), np.float64)
    ref = (x / 255 - m) / s
    if layout == "chw":
        x, ref = np.ascontiguousarray(x.transpose(0, 3, 1, 2)), ref.transpose(0, 3, 1, 2)
    out = Normalization(3, layout, mean, std).apply(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_buffer_pool_recycles_dropped_arrays() -> None:
    import gc

    from loader_client.contract.normalize import BufferPool

    pool = BufferPool(keep=2)
    a = pool.get((4, 4), np.float32)
    a_base = a.base
    del a
    gc.collect()
    b = pool.get((4, 4), np.float32)
    assert b.base is a_base  # the same memory, handed out again
    c = pool.get((4, 4), np.float32)
    assert c.base is not a_base  # b still holds the first buffer
    d = pool.get((2, 2), np.float32)
    assert d.shape == (2, 2)


def test_jpeg_without_end_marker_is_refused(tmp_path: Path, photo: np.ndarray) -> None:
    data = cv2.imencode(".jpg", photo)[1].tobytes()
    assert data.endswith(b"\xff\xd9")
    cut = data[:-2]  # every scan is there, only the end-of-image marker is missing
    with pytest.raises(DecodeError, match="truncated JPEG"):
        Decoder(config()).decode(cut, "cut.jpg")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    png = bytearray(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    png[16:24] = (50000).to_bytes(4, "big") * 2
    with pytest.raises(DecodeError, match="50000x50000 pixels exceeds --max-pixels"):
        Decoder(config()).decode(bytes(png), "bomb.png")
    small = cv2.imencode(".jpg", np.zeros((40, 40, 3), np.uint8))[1].tobytes()
    with pytest.raises(DecodeError, match="exceeds --max-pixels 1000"):
        Decoder(config(max_pixels=1000)).decode(small, "small.jpg")


def test_unreadable_file_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root in CI, where chmod 000 does not stop a read: make open() refuse instead.
    import builtins

    real_open = builtins.open

    def refuse(path: object, *args: object, **kwargs: object) -> object:
        if str(path).endswith("secret.jpg"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", refuse)
    with pytest.raises(DecodeError, match="permission denied"):
        read_file(str(tmp_path / "secret.jpg"))
    with pytest.raises(DecodeError, match="is a directory"):
        read_file(str(tmp_path))
