"""``--calib DIR``: the user's images and prompts calibrate the W8A8 language model's SmoothQuant smoothing.

Format of ``DIR`` (not recursive): images ``*.png``, ``*.jpg``, ``*.jpeg`` (any case), taken in file-name order,
and their prompts: ``<image stem>.txt`` next to an image is its prompt; an image without one takes the next line
of ``DIR/prompts.txt`` (one prompt per non-empty line, reused from the top when the images outnumber them). Each
pair becomes one LLaVA-1.5 conversation ``USER: <image>\\n{prompt} ASSISTANT:`` run through the export's own
processor files (tokenizer, image processor), with the image tokens replaced by the projected features of the
image: exactly what the language model reads at run time. Without ``--calib DIR`` the built-in text is used
(:func:`vlmx.torch_ref.lm_w8a8.calibration_ids`).

:func:`read_calib_dir` checks everything (and decodes every image) before the export starts and needs no torch;
:func:`lm_inputs_embeds` makes the language model's calibration inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PROMPTS_FILE = "prompts.txt"
#: LLaVA-1.5's conversation (the chat template of :mod:`vlmx.export.processor_files` renders the same text).
CONVERSATION = "USER: <image>\n{prompt} ASSISTANT:"
_FORMAT = (f"a directory of images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) with prompts: {PROMPTS_FILE} "
           "(one per line) or <image name>.txt per image")


class CalibError(ValueError):
    """Bad ``--calib DIR``; the message names the file and what to do."""


@dataclass(frozen=True)
class Sample:
    image: Path
    prompt: str


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibError(f"--calib: {path} cannot be read as UTF-8 text ({e}); fix or remove it") from None


def _check_image(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise CalibError(f"--calib: image {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); replace or "
                         "remove it") from None


def read_calib_dir(directory: str | Path) -> list[Sample]:
    """The (image, prompt) pairs of ``directory``, every image decoded once; raises :class:`CalibError`."""
    root = Path(directory)
    if not root.exists():
        raise CalibError(f"--calib {root} does not exist; pass {_FORMAT} (or a number N of random inputs for "
                         "static Q/DQ)")
    if not root.is_dir():
        raise CalibError(f"--calib {root} is not a directory; pass {_FORMAT}")
    images = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibError(f"--calib {root} holds no images; put {', '.join('*' + s for s in IMAGE_SUFFIXES)} files "
                         f"into it, each with a prompt ({PROMPTS_FILE} or <image name>.txt)")
    shared_file = root / PROMPTS_FILE
    shared = [ln.strip() for ln in _read_text(shared_file).splitlines() if ln.strip()] \
        if shared_file.is_file() else []
    samples, k = [], 0
    for img in images:
        own = img.with_suffix(".txt")
        if own.is_file() and own.name != PROMPTS_FILE:
            prompt = _read_text(own).strip()
            if not prompt:
                raise CalibError(f"--calib: {own} is empty; write the prompt for {img.name} into it")
        elif shared:
            prompt, k = shared[k % len(shared)], k + 1
        else:
            raise CalibError(f"--calib: image {img.name} has no prompt; write prompts into {shared_file} (one per "
                             f"line) or {own.name} next to the image")
        _check_image(img)
        samples.append(Sample(img, prompt))
    return samples


def lm_inputs_embeds(model, processor_dir: str | Path, samples: list[Sample], image_token_id: int) -> list:
    """One ``[S_i, H]`` float32 tensor per sample: the prompt's token embeddings with the image tokens replaced by
    the projected image features (the vision tower runs in float32 for the call, its weights are left as they
    were). ``processor_dir`` holds the export's processor files."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(processor_dir))
    embed = model.get_input_embeddings()
    towers = [model.model.vision_tower, model.model.multi_modal_projector]
    dtypes = [next(m.parameters()).dtype for m in towers]
    out = []
    try:
        for m in towers:
            m.float()
        with torch.no_grad():
            for s in samples:
                with Image.open(s.image) as im:
                    batch = processor(images=im.convert("RGB"), text=CONVERSATION.format(prompt=s.prompt),
                                      return_tensors="pt")
                ids = batch["input_ids"][0]
                feats = model.model.get_image_features(pixel_values=batch["pixel_values"].float())
                feats = getattr(feats, "pooler_output", feats)
                feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
                h = embed(ids).float()
                where = ids == image_token_id
                feats = feats.reshape(-1, h.shape[-1])
                if int(where.sum()) != feats.shape[0]:
                    raise CalibError(f"--calib: the processor made {int(where.sum())} image tokens for {s.image.name}"
                                     f" but the vision tower gave {feats.shape[0]} features; check the checkpoint's "
                                     "processor_config.json (patch_size, vision_feature_select_strategy)")
                h[where] = feats.float()
                out.append(h)
    finally:
        for m, dt in zip(towers, dtypes):
            m.to(dt)
    return out
