"""
Images in, encoder inputs out: DeepSeek-OCR's resolution modes, Gundam tiling and normalisation, plus a loader
that turns anything PIL opens into RGB or fails with one clear error.

| mode    | global view                       | tiles                         | tokens (no tiles) |
|---------|-----------------------------------|-------------------------------|-------------------|
| tiny    | 512, squashed to a square         | -                             | 73                |
| small   | 640, squashed                     | -                             | 111               |
| base    | 1024, letterboxed on grey         | -                             | 273               |
| large   | 1280, letterboxed                 | -                             | 421               |
| gundam  | 1024, letterboxed                 | 640 px, 2..6 (or 9), if > 640 | 273 + tiles       |

Custom sizes (for the tiny CPU encoder, or experiments): "resize:S" squashes to S x S, "pad:S" letterboxes to
S x S, "gundam:T:G" tiles at T px (when a side exceeds T) with a G px global view, and "rect:W:H" squashes to a
W x H rectangle, and "line:W:H" scales a text line to height H keeping its aspect, left-aligned, and pads it on the
right with grey to W (squashing it only where it is wider than W: line:2048:64 gives one row of 32 tokens, and
glyphs of the same size whatever the line's length); "line:W:H:C" keeps C SAM patch columns per token (4, the
default, 2 or 1: line:2048:64:1 gives one row of 128 tokens). Sizes are multiples of 64.

Pixels are normalised with mean 0.5, std 0.5 to [-1, 1]; the letterbox grey (127, 127, 127) becomes -1/255.
"""

import warnings
from collections import namedtuple

import numpy as np
import torch
from PIL import Image, ImageOps

from nanovlm.deepencoder import DeepEncoderConfig

class ImageMode(namedtuple("ImageMode", "name global_size fit tile_size global_height cols_per_token",
                           defaults=(None, 4))):
    """
    A resolved image mode: name, the string it came from ("base", "rect:1024:64", ...: what metas store and flags
    take); global_size, the width of the global view; fit, how the image meets that size: "squash" (resized to
    it), "letterbox" (centred, keeping its aspect, grey around) or "line" (height filled, grey on the right);
    tile_size, the side of a tile, None for modes without tiles; global_height, the height of a rectangular
    global view, None for a square one; cols_per_token, SAM patch columns per visual token (4: DeepSeek's
    compressor; "line:W:H:C" may keep 2 or 1, see DeepEncoderConfig.cols_per_token). A mode is resolved once, where the flag or meta is read (resolve_mode),
    and travels as this object.
    """
    __slots__ = ()

    def __str__(self):
        return self.name


MODES = {
    "tiny": ImageMode("tiny", 512, "squash", None),
    "small": ImageMode("small", 640, "squash", None),
    "base": ImageMode("base", 1024, "letterbox", None),
    "large": ImageMode("large", 1280, "letterbox", None),
    "gundam": ImageMode("gundam", 1024, "letterbox", 640),
}

ENCODER = DeepEncoderConfig()  # the encoder geometry (16 px patches, 4x compressor): every size shares it
PAD_COLOR = (127, 127, 127)  # int(0.5 * 255): the normalisation mean, rounded down
MAX_TILES = 6  # vLLM's MAX_CROPS; the Hugging Face inference path allows 9
MAX_IMAGE_PIXELS = 8192 * 8192  # our own decompression-bomb guard (a 600 dpi A4 scan is ~35M pixels)


class ImageLoadError(ValueError):
    """An image file that cannot be used: missing, unreadable, corrupt, truncated, empty or too large."""


PreprocessedImage = namedtuple("PreprocessedImage", "global_view tiles tiling")
PreprocessedImage.__doc__ = """
global_view: (3, H, W) float tensor (H = W but in rect modes).
tiles: (P, 3, T, T) float tensor in row-major tile order, or None when the image is not tiled.
tiling: (w, h) tile columns and rows, width first; (1, 1) when not tiled.
"""


def resolve_mode(mode):
    """A mode name ("base", "resize:128", ...) -> ImageMode. A bad name is a ValueError listing the valid ones."""
    if isinstance(mode, ImageMode):
        return mode
    if mode in MODES:
        return MODES[mode]
    kind, *sizes = str(mode).split(":")
    try:
        sizes = [int(s) for s in sizes]
    except ValueError:
        sizes = []
    cols_per_token = sizes.pop() if kind == "line" and len(sizes) == 3 else 4
    shapes = {"resize": 1, "pad": 1, "gundam": 2, "rect": 2, "line": 2}
    if (kind not in shapes or len(sizes) != shapes[kind] or any(s <= 0 or s % 64 for s in sizes)
            or cols_per_token not in (1, 2, 4)):
        raise ValueError(f"unknown image mode {mode!r}: use one of {', '.join(MODES)}, or 'resize:S', 'pad:S', "
                         f"'gundam:T:G', 'rect:W:H' or 'line:W:H' with sizes that are positive multiples of 64 "
                         f"('line:W:H:C' keeps C = 4, 2 or 1 SAM patch columns per token)")
    if kind == "gundam":
        return ImageMode(mode, sizes[1], "letterbox", sizes[0])
    if kind in ("rect", "line"):
        return ImageMode(mode, sizes[0], "squash" if kind == "rect" else "line", None, sizes[1], cols_per_token)
    return ImageMode(mode, sizes[0], "squash" if kind == "resize" else "letterbox", None)


def global_shape(mode):
    """(width, height) of the mode's global view."""
    mode = resolve_mode(mode)
    return mode.global_size, mode.global_height or mode.global_size


# -----------------------------------------------------------------------------
# Tiling (Gundam)

def tiling_candidates(max_tiles):
    """Every (w, h) grid with 2 <= w*h <= max_tiles, in the reference's order: a set of pairs sorted by tile count.
    Ties keep the set's iteration order, which decides between equally good grids, so build the set the same way."""
    ratios = set((i, j) for n in range(2, max_tiles + 1)
                 for i in range(1, n + 1) for j in range(1, n + 1) if 2 <= i * j <= max_tiles)
    return sorted(ratios, key=lambda r: r[0] * r[1])


def choose_tiling(width, height, mode, max_tiles=MAX_TILES):
    """(w, h) tile columns and rows for an image of this size; (1, 1) = no tiles. Tiles are made only in tiling
    modes and only when a side exceeds the tile size; then the grid whose aspect ratio is closest to the image's
    wins, and a later grid with an equal distance replaces it when the image has more than half its area."""
    mode = resolve_mode(mode)
    if not 2 <= max_tiles <= 9:
        raise ValueError(f"max_tiles must be between 2 and 9, got {max_tiles}")
    if mode.tile_size is None or (width <= mode.tile_size and height <= mode.tile_size):
        return (1, 1)
    aspect, area = width / height, width * height
    best, best_distance = (1, 1), float("inf")
    for w, h in tiling_candidates(max_tiles):
        distance = abs(aspect - w / h)
        if distance < best_distance:
            best, best_distance = (w, h), distance
        elif distance == best_distance and area > 0.5 * mode.tile_size * mode.tile_size * w * h:
            best = (w, h)
    return best


def count_image_tokens(width, height, mode, max_tiles=MAX_TILES):
    """
    Length of the image's sequence for the language model (the number of image placeholder ids in the prompt):
    the global grid with a newline per row, the stitched tile grid with a newline per row (if tiled), and one
    separator. width, height: the image's size after EXIF rotation (what load_image returns).
    """
    mode = resolve_mode(mode)
    width_px, height_px = global_shape(mode)
    rows = ENCODER.tokens_per_side(height_px)
    cols = -(-ENCODER.patches_per_side(width_px) // mode.cols_per_token)
    count = rows * (cols + 1) + 1
    w, h = choose_tiling(width, height, mode, max_tiles)
    if (w, h) != (1, 1):
        m = ENCODER.tokens_per_side(mode.tile_size)
        count += (h * m) * (w * m + 1)
    return count


# -----------------------------------------------------------------------------
# Pixels

def to_tensor(image):
    """RGB PIL image -> (3, H, W) float tensor normalised to [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (pixels.float() / 255.0 - 0.5) / 0.5


def global_view(image, mode):
    """The whole image at the mode's global size: squashed (tiny, small, rect), letterboxed on grey, keeping the
    aspect ratio and upscaling small images too (base, large, gundam), or as a text line (line)."""
    if mode.fit == "squash":
        return image.resize(global_shape(mode), Image.Resampling.BICUBIC)
    if mode.fit == "line":
        return fit_line(image, *global_shape(mode))
    return ImageOps.pad(image, global_shape(mode), method=Image.Resampling.BICUBIC, color=PAD_COLOR)


def fit_line(image, width, height):
    """A text line at the height of the view, its aspect kept (so a glyph has the same shape in a short word as
    in a long line), from the left edge, grey after its end; a line too long for the width is squashed into it."""
    scaled_width = min(width, max(1, round(image.width * height / image.height)))
    view = Image.new("RGB", (width, height), PAD_COLOR)
    view.paste(image.resize((scaled_width, height), Image.Resampling.BICUBIC), (0, 0))
    return view


def make_tiles(image, tiling, tile_size):
    """Stretch the image onto the (w, h) grid exactly (no aspect preservation) and cut it, row-major."""
    w, h = tiling
    stretched = image.resize((tile_size * w, tile_size * h), Image.Resampling.BICUBIC)
    return [stretched.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
            for r in range(h) for c in range(w)]


def preprocess(image, mode, max_tiles=MAX_TILES):
    """
    An image (a PIL image or a path) -> PreprocessedImage(global_view, tiles, tiling), ready for
    DeepEncoder.encode_image / encode_images. Its sequence length is count_image_tokens(*image.size, mode).
    """
    if not isinstance(image, Image.Image):
        image = load_image(image)
    image = to_rgb(image)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has no pixels ({image.width}x{image.height})")
    mode = resolve_mode(mode)
    view = to_tensor(global_view(image, mode))
    tiling = choose_tiling(image.width, image.height, mode, max_tiles)
    tiles = None
    if tiling != (1, 1):
        tiles = torch.stack([to_tensor(t) for t in make_tiles(image, tiling, mode.tile_size)])
    return PreprocessedImage(view, tiles, tiling)


# -----------------------------------------------------------------------------
# Loading

def to_rgb(image):
    """
    Any PIL mode -> RGB. Transparency is composited on white (a transparent page reads as paper, where a plain
    convert would make it black); 16/32-bit grayscale is scaled to 8 bits rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max() if values.size else 0
        if image.mode.startswith("I;16") or 255 < top <= 65535:
            values = values / 257.0  # 16-bit range
        elif top > 65535:
            low = values.min()
            values = (values - low) / (top - low) * 255.0
        elif image.mode == "F" and top <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path, max_pixels=MAX_IMAGE_PIXELS):
    """
    Open any image PIL can read, apply its EXIF rotation and return it as RGB. A missing, unreadable, corrupt or
    truncated file, an image with no pixels, or one over max_pixels (a decompression bomb) raises ImageLoadError
    (a ValueError) that names the file.
    """
    try:
        with warnings.catch_warnings():
            # we enforce our own pixel limit below; PIL's global one only warns (or fails) at its own size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width <= 0 or height <= 0:
                    raise ImageLoadError(f"image {path} has no pixels ({width}x{height})")
                if width * height > max_pixels:
                    raise ImageLoadError(f"image {path} is {width}x{height} = {width * height:,} pixels, over the "
                                         f"limit of {max_pixels:,} (a decompression bomb?)")
                image.load()  # decode now, so a truncated or corrupt file fails here and not later
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"image {path} does not exist") from None
    except Exception as e:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
