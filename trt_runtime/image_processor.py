"""The checkpoint's image processor at run time, in numpy + PIL: transformers' PIL backend step for step.

``preprocessor_config.json`` of a CLIP, SigLIP or LLaVA image processor: convert to RGB (transparency composited
onto white), LLaVA-1.5's optional ``do_pad`` to a square of the mean colour, resize (shortest edge or fixed size,
the checkpoint's PIL filter), center crop, rescale (float64 multiply, float32 result), normalize (float32).
The result equals ``CLIPImageProcessorPil`` / ``SiglipImageProcessorPil`` / ``LlavaImageProcessorPil`` bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
#: Class defaults of the image processors vlmx runs (keys not in a checkpoint's config take these values).
_CLIP = dict(resample=3, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, size={"shortest_edge": 224},
             default_to_square=False, crop_size={"height": 224, "width": 224}, do_resize=True, do_center_crop=True,
             do_rescale=True, do_normalize=True, do_convert_rgb=True, do_pad=False, rescale_factor=1 / 255)
_SIGLIP = dict(_CLIP, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), size={"height": 224, "width": 224},
               do_center_crop=False, crop_size=None)
FAMILIES = {"CLIPImageProcessor": _CLIP, "LlavaImageProcessor": _CLIP, "SiglipImageProcessor": _SIGLIP}
#: Largest image vlm-run decodes (the vision tower resizes to a few hundred pixels anyway).
MAX_IMAGE_PIXELS = 50_000_000


class ImageError(ValueError):
    """A bad image or image-processor config; the message says what to do."""


def load_image(image) -> "PIL.Image.Image":  # noqa: F821
    """Open an image path (or pass a PIL image / HxWx3 uint8 array through), with one clear error; images over
    :data:`MAX_IMAGE_PIXELS` (or PIL's decompression-bomb limit) are refused before decoding."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ImageError(f"image array must be HxWx3, got shape {image.shape}")
        return Image.fromarray(image.astype(np.uint8), "RGB")
    path = Path(image)
    if not path.is_file():
        raise ImageError(f"--image {path} does not exist; pass a PNG/JPEG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"--image {path} is {im.width}x{im.height} pixels, more than vlmx reads "
                                     f"({MAX_IMAGE_PIXELS // 10**6} megapixels); resize it first")
                im.load()
                return im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"--image {path} is too large to decode safely (PIL's decompression-bomb limit); resize "
                         "it first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"--image {path} is not a readable image ({e.__class__.__name__}); pass a PNG/JPEG "
                         "file") from None


def to_rgb(image) -> np.ndarray:
    """HxWx3 uint8, transparency composited onto white (transformers' ``convert_to_rgb``)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.array(image.convert("RGB"))


def _size(value, default_to_square: bool, name: str) -> dict | None:
    """transformers' ``get_size_dict``: an int, [h, w] or a dict."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    raise ImageError(f"preprocessor_config.json: {name} {value!r} is not a size; re-export")


def resize_shape(height: int, width: int, size: dict) -> tuple[int, int]:
    """Output (height, width): the shortest edge to ``size["shortest_edge"]`` (long edge floored), or fixed."""
    if "shortest_edge" in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        if size.get("longest_edge") is not None:
            raise ImageError("preprocessor_config.json: size with shortest_edge and longest_edge is not supported")
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise ImageError(f"preprocessor_config.json: size {size} needs shortest_edge or height and width; re-export")


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """CHW center crop; an image smaller than the crop is zero-padded around (transformers' ``center_crop``)."""
    h, w = image.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[..., top:top + height, left:left + width]
    nh, nw = max(height, h), max(width, w)
    padded = np.zeros(image.shape[:-2] + (nh, nw), dtype=image.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[..., tp:tp + h, lp:lp + w] = image
    top, left = top + tp, left + lp
    return padded[..., max(0, top):min(nh, top + height), max(0, left):min(nw, left + width)]


def pad_to_square(image: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    """CHW padded to its longest edge, centred, background ``color`` (LLaVA-1.5's ``expand2square``)."""
    c, h, w = image.shape
    if h == w:
        return image
    n = max(h, w)
    out = np.empty((c, n, n), dtype=image.dtype)
    out[:] = np.asarray(color, dtype=image.dtype).reshape(c, 1, 1)
    if w > h:
        out[:, (n - h) // 2:(n - h) // 2 + h, :] = image
    else:
        out[:, :, (n - w) // 2:(n - w) // 2 + w] = image
    return out


@dataclass
class ImageProcessor:
    """One checkpoint's image settings; ``__call__(image) -> pixel_values`` [1, 3, H, W] float32."""

    size: dict
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = True
    crop_size: dict | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    do_pad: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ImageProcessor":
        kind = str(config.get("image_processor_type", "CLIPImageProcessor"))
        base = next((v for k, v in FAMILIES.items() if kind in (k, k + "Fast", k + "Pil")), None)
        if base is None:
            raise ImageError(f"preprocessor_config.json: image_processor_type {kind} is not supported; vlmx runs "
                             f"{', '.join(FAMILIES)}")
        c = {**base, **{k: v for k, v in config.items() if k in base}}
        square = bool(c.pop("default_to_square"))
        c["size"] = _size(c["size"], square, "size")
        c["crop_size"] = _size(c["crop_size"], True, "crop_size")
        c["image_mean"], c["image_std"] = tuple(c["image_mean"]), tuple(c["image_std"])
        if c["do_center_crop"] and c["crop_size"] is None:
            raise ImageError("preprocessor_config.json: do_center_crop without crop_size; re-export")
        return cls(**c)

    @classmethod
    def from_dir(cls, root: str | Path) -> "ImageProcessor":
        from .tokenizer import read_json

        root = Path(root)
        path = root / "preprocessor_config.json"  # else transformers 5's layout: inside processor_config.json
        config = read_json(path) if path.is_file() else read_json(root / "processor_config.json").get("image_processor")
        if not isinstance(config, dict):
            raise ImageError(f"{root} has no preprocessor_config.json (nor an image_processor entry in "
                             "processor_config.json); re-run vlm-export (it copies the checkpoint's image processor "
                             "into the export)")
        return cls.from_config(config)

    def __call__(self, image) -> np.ndarray:
        from PIL import Image

        pil = load_image(image)
        hwc = to_rgb(pil) if self.do_convert_rgb else np.array(pil)
        if hwc.ndim == 2:
            hwc = hwc[..., None]
        chw = np.moveaxis(hwc, -1, 0)
        if self.do_pad:
            chw = pad_to_square(chw, tuple(int(x * 255) for x in self.image_mean))
        if self.do_resize:
            h, w = resize_shape(*chw.shape[1:], self.size)
            im = Image.fromarray(np.moveaxis(chw, 0, -1).squeeze(-1) if chw.shape[0] == 1 else np.moveaxis(chw, 0, -1))
            out = np.array(im.resize((w, h), resample=self.resample))
            chw = np.moveaxis(out[..., None] if out.ndim == 2 else out, -1, 0)
        if self.do_center_crop:
            chw = center_crop(chw, self.crop_size["height"], self.crop_size["width"])
        x = chw
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            mean = np.asarray(self.image_mean, dtype=x.dtype).reshape(-1, 1, 1)
            std = np.asarray(self.image_std, dtype=x.dtype).reshape(-1, 1, 1)
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32)[None]
