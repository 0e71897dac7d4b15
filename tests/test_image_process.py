"""
Image modes, Gundam tiling, token counts and pixel geometry as in DeepSeek-OCR, and the loader's conversions
and errors.
"""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nanovlm.image_process import ImageLoadError, choose_tiling, count_image_tokens, load_image, preprocess, \
    resolve_mode, tiling_candidates

GREY = (127 / 255 - 0.5) / 0.5  # the letterbox colour after normalisation: -1/255


# -----------------------------------------------------------------------------
# token counts and tiling

@pytest.mark.parametrize("mode,tokens", [("tiny", 73), ("small", 111), ("base", 273), ("large", 421),
                                         ("gundam", 273)])
def test_token_counts_without_tiles(mode, tokens):
    assert count_image_tokens(600, 400, mode) == tokens
    assert count_image_tokens(640, 640, mode) == tokens  # gundam tiles only above 640


@pytest.mark.parametrize("size,tiling,tokens", [
    ((1000, 1400), (2, 3), 903),  # portrait A4
    ((800, 600), (3, 2), 893),
    ((641, 300), (2, 1), 483),
    ((700, 700), (2, 2), 693),
    ((3000, 1000), (3, 1), 10 * 31 + 273),
])
def test_gundam_token_counts(size, tiling, tokens):
    assert choose_tiling(*size, "gundam") == tiling
    assert count_image_tokens(*size, "gundam") == tokens


def test_gundam_nine_tiles_when_asked():
    assert choose_tiling(1920, 1080, "gundam") == (2, 1)
    assert choose_tiling(1920, 1080, "gundam", max_tiles=9) == (4, 2)
    assert count_image_tokens(1920, 1920, "gundam", max_tiles=9) == 30 * 31 + 273 == 1203
    assert choose_tiling(1920, 1920, "gundam") == (2, 2)  # (3, 3) is not a candidate at 6
    for bad in (1, 10):
        with pytest.raises(ValueError, match="max_tiles"):
            count_image_tokens(1000, 1000, "gundam", max_tiles=bad)


@pytest.mark.parametrize("size,six,nine", [((1000, 1400), (2, 3), (2, 3)), ((2480, 3508), (2, 3), (2, 3)),
                                           ((1920, 1080), (2, 1), (4, 2)), ((800, 600), (3, 2), (3, 2)),
                                           ((700, 700), (2, 2), (2, 2)), ((3000, 1000), (3, 1), (3, 1)),
                                           ((641, 300), (2, 1), (2, 1))])
def test_tiling_examples(size, six, nine):
    assert choose_tiling(*size, "gundam", 6) == six
    assert choose_tiling(*size, "gundam", 9) == nine


def test_candidate_order_decides_ties():
    assert tiling_candidates(6) == [(1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1),
                                    (2, 3), (1, 6), (3, 2)]
    assert tiling_candidates(9) == [(1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6),
                                    (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9),
                                    (3, 3), (9, 1)]
    # a square image ties (2, 2) with (3, 3) at max 9: the later one wins only for a large enough image
    assert choose_tiling(700, 700, "gundam", 9) == (2, 2)
    assert choose_tiling(1400, 1400, "gundam", 9) == (3, 3)


def test_custom_modes():
    assert resolve_mode("resize:128") == ("resize:128", 128, "squash", None, None, 4)
    assert resolve_mode("pad:256") == ("pad:256", 256, "letterbox", None, None, 4)
    assert resolve_mode("gundam:128:256") == ("gundam:128:256", 256, "letterbox", 128, None, 4)
    assert resolve_mode("line:2048:64") == ("line:2048:64", 2048, "line", None, 64, 4)
    assert resolve_mode("line:2048:64:1") == ("line:2048:64:1", 2048, "line", None, 64, 1)
    assert count_image_tokens(90, 30, "line:2048:64") == 1 * 33 + 1
    assert count_image_tokens(90, 30, "line:2048:64:2") == 1 * 65 + 1  # 2 patch columns a token
    assert count_image_tokens(90, 30, "line:2048:64:1") == 1 * 129 + 1  # one token per patch column
    rect = resolve_mode("rect:2048:64")
    assert rect == ("rect:2048:64", 2048, "squash", None, 64, 4) and str(rect) == "rect:2048:64"
    assert resolve_mode(rect) is rect and resolve_mode("base") is resolve_mode("base")  # resolved once, kept
    assert count_image_tokens(320, 128, "rect:2048:64") == 1 * 33 + 1  # one row of 32 tokens, newline, separator
    assert count_image_tokens(320, 128, "rect:1024:128") == 2 * 17 + 1
    assert count_image_tokens(50, 500, "resize:128") == 2 * 3 + 1
    assert count_image_tokens(100, 100, "gundam:128:256") == 4 * 5 + 1
    assert count_image_tokens(300, 200, "gundam:128:256") == (2 * 2) * (3 * 2 + 1) + 21  # 3x2 tiles of 2x2 tokens
    for bad in ("huge", "resize:100", "pad:0", "gundam:128", "resize:x", "pad:-64", "rect:2048", "rect:100:64",
                "line:64", "line:2048:64:3", "rect:2048:64:1"):
        with pytest.raises(ValueError, match="image mode"):
            count_image_tokens(10, 10, bad)


# -----------------------------------------------------------------------------
# pixels

def white(width, height):
    return Image.new("RGB", (width, height), (255, 255, 255))


def content_span(line):
    """First and last index along a line of pixels that is not the letterbox grey."""
    idx = (line - GREY).abs().gt(1e-3).nonzero().flatten()
    return idx.min().item(), idx.max().item()


def test_letterbox_geometry():
    view, tiles, tiling = preprocess(white(1000, 1400), "base")
    assert view.shape == (3, 1024, 1024) and tiles is None and tiling == (1, 1)
    assert content_span(view[0, 512]) == (146, 876)
    assert view[0, 512, 0].item() == pytest.approx(GREY)
    view = preprocess(white(600, 400), "large").global_view  # small images are scaled up too
    assert view.shape == (3, 1280, 1280)
    view = preprocess(white(600, 400), "base").global_view
    assert content_span(view[0, :, 512]) == (170, 852)


def test_squash_modes_fill_the_square():
    for mode, size in (("tiny", 512), ("small", 640), ("resize:128", 128)):
        view = preprocess(white(1000, 300), mode).global_view
        assert view.shape == (3, size, size)
        torch.testing.assert_close(view, torch.ones(3, size, size))  # no grey anywhere: squashed, not padded


def test_line_mode_keeps_the_glyphs_shape():
    """line:W:H fills the height, keeps the aspect and pads grey on the right; a line wider than W is squashed."""
    view = preprocess(white(300, 30), "line:2048:64").global_view
    assert view.shape == (3, 64, 2048)
    assert content_span(view[0, 32]) == (0, 639)  # 300x30 at height 64 is 640 wide; grey after it
    assert view[0, 32, 640].item() == pytest.approx(GREY)
    view = preprocess(white(3000, 30), "line:2048:64").global_view
    torch.testing.assert_close(view, torch.ones(3, 64, 2048))  # 6400 wide at height 64: squashed into 2048


def test_normalisation():
    image = Image.new("RGB", (64, 64), (0, 127, 255))
    view = preprocess(image, "pad:64").global_view
    assert view[0].unique().tolist() == [-1.0]
    assert view[1].unique().tolist() == pytest.approx([GREY])
    assert view[2].unique().tolist() == [1.0]


def test_tiles_are_row_major():
    # a 1280x1920 image maps 1:1 onto a 2x3 grid of 640 px tiles; paint each tile region its own colour
    pixels = np.zeros((1920, 1280, 3), dtype=np.uint8)
    for i in range(6):
        row, col = divmod(i, 2)
        pixels[row * 640:(row + 1) * 640, col * 640:(col + 1) * 640] = (40 * i, 0, 0)
    pre = preprocess(Image.fromarray(pixels), "gundam")
    assert pre.tiling == (2, 3) and pre.tiles.shape == (6, 3, 640, 640)
    assert pre.global_view.shape == (3, 1024, 1024)
    for i in range(6):
        assert pre.tiles[i, 0, 320, 320].item() == pytest.approx((40 * i / 255 - 0.5) / 0.5)
    assert count_image_tokens(1280, 1920, "gundam") == 903


def test_preprocess_accepts_a_path(tmp_path):
    path = tmp_path / "page.png"
    white(700, 900).save(path)
    pre = preprocess(str(path), "gundam")
    assert pre.tiling == choose_tiling(700, 900, "gundam") and len(pre.tiles) == pre.tiling[0] * pre.tiling[1]


# -----------------------------------------------------------------------------
# loading: conversions

def saved(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = load_image(saved(tmp_path, rgba, "a.png"))
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 255, 255) and image.getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (8, 8), (0, 128))  # black at half opacity over white paper
    assert load_image(saved(tmp_path, la, "la.png")).getpixel((1, 1)) == (127, 127, 127)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_image(saved(tmp_path, p, "p.png")).getpixel((0, 0)) == (10, 20, 30)
    assert load_image(saved(tmp_path, p, "pt.png", transparency=1)).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_gray_and_bilevel(tmp_path):
    assert load_image(saved(tmp_path, Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "c.jpg")).getpixel((2, 2)) \
        == pytest.approx((255, 255, 255), abs=2)
    assert load_image(saved(tmp_path, Image.new("L", (8, 8), 77), "l.png")).getpixel((2, 2)) == (77, 77, 77)
    assert load_image(saved(tmp_path, Image.new("1", (8, 8), 1), "b.png")).getpixel((2, 2)) == (255, 255, 255)


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535, 257]], dtype=np.uint16)
    path = saved(tmp_path, Image.fromarray(values), "g16.png")
    assert Image.open(path).mode.startswith("I")  # I;16 (or I in older Pillow)
    image = load_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 1]


def test_float_and_32_bit_images(tmp_path):
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert [load_image(saved(tmp_path, f, "f.tiff")).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    i32 = Image.fromarray(np.array([[0, 100, 200]], dtype=np.int32), mode="I")
    assert [load_image(saved(tmp_path, i32, "i.tiff")).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 200]


def test_exif_rotation_is_applied(tmp_path):
    image = white(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = saved(tmp_path, image, "r.jpg", exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


# -----------------------------------------------------------------------------
# loading: errors, each one ImageLoadError (a ValueError) naming the file

def png_header(width, height):
    """A PNG signature and IHDR claiming width x height, then an empty IEND: a header with no real pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_load_error(path, *words):
    with pytest.raises(ValueError) as info:
        load_image(path)
    assert isinstance(info.value, ImageLoadError)
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_missing_file(tmp_path):
    assert_load_error(tmp_path / "nope.png", "does not exist")


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.png"
    path.write_bytes(b"this is not an image at all" * 10)
    assert_load_error(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    noise = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    assert_load_error(path)


def test_zero_pixel_image(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(png_header(0, 10))
    assert_load_error(path)
    with pytest.raises(ValueError, match="no pixels"):
        preprocess(Image.new("RGB", (0, 0)), "base")


def test_decompression_bomb(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(100_000, 100_000))  # 10 gigapixels claimed in a 50-byte file
    assert_load_error(path, "pixels")
    small = saved(tmp_path, white(100, 100), "ok.png")
    load_image(small)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(small, max_pixels=5000)
