"""The text/image processor files an export carries, so the runtime needs nothing but the export directory.

With ``--checkpoint`` the checkpoint's own files are copied (tokenizer, its config and special tokens, chat template,
processor and image-processor configs, generation config). A random-weight preset gets the same set, made from
the committed tiny BPE (:data:`vlmx.torch_ref.models.TOKENIZER_FILE`) with ``<image>`` and ``<pad>`` added at the
preset's ids, LLaVA-1.5's chat template and the preset's CLIP/SigLIP image settings; a real-weight preset with its
own tokenizer (``llava-micro``: SmolLM2's, read from its GGUF) gets that tokenizer unchanged, a ChatML template that
takes LLaVA content lists and an existing special token as the image token. Either way the files are what
transformers' ``AutoProcessor.from_pretrained`` reads, and the manifest lists them under ``processor``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

#: Files copied from a checkpoint when present (``tokenizer.json`` and ``processor_config.json`` are required; the
#: image settings are ``preprocessor_config.json`` or, as transformers 5 saves them, inside processor_config.json).
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
                   "generation_config.json")
REQUIRED_FILES = {"tokenizer.json": "save a fast tokenizer into it (tokenizer.save_pretrained(DIR))",
                  "processor_config.json": "save the LlavaProcessor into it (processor.save_pretrained(DIR))"}
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
#: LLaVA-1.5's chat template (llava-hf): ``USER: <image>\n{text} ASSISTANT:``.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def chatml_image_template(image_token: str) -> str:
    """SmolLM2's ChatML turns for LLaVA content lists: images first (``image_token`` and a newline), then text; no
    default system turn."""
    items = "message['content'] | selectattr('type', 'equalto', "
    return ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            f"{{% for content in {items}'image') %}}{{{{ {image_token!r} + '\n' }}}}{{% endfor %}}"
            f"{{% for content in {items}'text') %}}{{{{ content['text'] }}}}{{% endfor %}}"
            "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class ProcessorFilesError(ValueError):
    """The checkpoint lacks a processor file, or its tokenizer does not fit the model."""


def check_checkpoint_files(checkpoint: str | Path, config) -> None:
    """Raise :class:`ProcessorFilesError` unless ``checkpoint`` has the processor files and its tokenizer fits the
    model ``config`` (a ``LlavaConfig``): the image token has the model's ``image_token_id``, every id < vocab."""
    from tokenizers import Tokenizer

    root = Path(checkpoint)
    for name, todo in REQUIRED_FILES.items():
        if not (root / name).is_file():
            raise ProcessorFilesError(f"--checkpoint {root} has no {name}; {todo}, the export carries it to the "
                                      "runtime")
    try:
        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - any parse failure: the file is not a tokenizers file
        raise ProcessorFilesError(f"{root / 'tokenizer.json'} is not a tokenizers file ({e}); re-save the "
                                  "tokenizer with save_pretrained") from None
    processor = _read_json(root / "processor_config.json")
    if not (root / "preprocessor_config.json").is_file() and "image_processor" not in processor:
        raise ProcessorFilesError(f"--checkpoint {root} has no image processor (no preprocessor_config.json, no "
                                  "image_processor in processor_config.json); save the LlavaProcessor into it")
    if "patch_size" not in processor:
        raise ProcessorFilesError(f"--checkpoint {root}/processor_config.json has no patch_size; save a "
                                  "LlavaProcessor built with patch_size and vision_feature_select_strategy")
    image_token = processor.get("image_token", IMAGE_TOKEN)
    found, want = tok.token_to_id(image_token), config.image_token_id
    if found != want:
        raise ProcessorFilesError(f"--checkpoint {root}: the tokenizer maps the image token {image_token!r} to "
                                  f"{found}, but config.json has image_token_id {want}; add the token to the "
                                  "tokenizer (add_special_tokens) or fix image_token_id")
    size, vocab = tok.get_vocab_size(with_added_tokens=True), config.text_config.vocab_size
    if size > vocab:
        raise ProcessorFilesError(f"--checkpoint {root}: the tokenizer has {size} tokens but the language model's "
                                  f"vocab_size is {vocab}; resize the model's embeddings to the tokenizer")


def write_processor_files(out: str | Path, spec, checkpoint: str | Path | None = None) -> dict:
    """Put the processor files into the export directory ``out``; returns the manifest's ``processor`` field."""
    out = Path(out)
    if checkpoint is not None:
        files = [n for n in PROCESSOR_FILES if (Path(checkpoint) / n).is_file()]
        for name in files:
            shutil.copyfile(Path(checkpoint) / name, out / name)
        return {"source": "checkpoint", "files": files}
    files = preset_processor_files(spec)
    for name, content in files.items():
        (out / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=2) + "\n")
    return {"source": "preset", "files": sorted(files)}


def preset_tokenizer_json(spec) -> str:
    """The committed tiny BPE with inert filler pieces up to ``image_token_id`` (so the 7B presets keep
    LLaVA-1.5's ids: ``<image>`` 32000, ``<pad>`` 32001), then ``<image>`` and ``<pad>`` as special tokens."""
    from tokenizers import AddedToken, Tokenizer

    from vlmx.torch_ref import models

    data = json.loads(Path(models.TOKENIZER_FILE).read_text())
    vocab = data["model"]["vocab"]
    if not len(vocab) <= spec.image_token_id <= spec.vocab_size - 2:
        raise ProcessorFilesError(f"preset {spec.name}: image_token_id {spec.image_token_id} must lie in "
                                  f"[{len(vocab)}, vocab_size - 2 = {spec.vocab_size - 2}] for the tiny tokenizer")
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), spec.image_token_id)})
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IMAGE_TOKEN, PAD_TOKEN)])
    assert tok.token_to_id(IMAGE_TOKEN) == spec.image_token_id == spec.pad_token_id - 1
    assert (tok.token_to_id("<s>"), tok.token_to_id("</s>")) == (models.BOS_ID, models.EOS_ID)
    return tok.to_str()


def _image_settings(spec) -> dict:
    """preprocessor_config.json of a preset: CLIP (shortest edge + center crop) or a fixed resize (SigLIP, DINOv2
    with ImageNet statistics)."""
    size = spec.image_size
    image = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": list(spec.image_mean), "image_std": list(spec.image_std), "do_convert_rgb": True}
    if spec.vision == "clip":
        image.update(image_processor_type="CLIPImageProcessor", size={"shortest_edge": size}, do_center_crop=True,
                     crop_size={"height": size, "width": size})
    else:
        image.update(image_processor_type="SiglipImageProcessor", size={"height": size, "width": size})
    return {**image, "processor_class": "LlavaProcessor"}


def _processor_config(spec, image_token: str) -> dict:
    return {"processor_class": "LlavaProcessor", "image_token": image_token, "patch_size": spec.patch_size,
            "vision_feature_select_strategy": spec.select_strategy,
            "num_additional_image_tokens": 1 if spec.has_cls else 0}


def preset_processor_files(spec) -> dict[str, str | dict]:
    """name -> content of every processor file for a preset without a checkpoint."""
    if spec.tokenizer == "smollm2":
        return real_tokenizer_files(spec)
    from vlmx.torch_ref import models

    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": PAD_TOKEN}
    return {
        "tokenizer.json": preset_tokenizer_json(spec),
        "tokenizer_config.json": {"tokenizer_class": "TokenizersBackend", **special, "add_bos_token": True,
                                  "add_eos_token": False, "clean_up_tokenization_spaces": False,
                                  "model_max_length": spec.max_seq_len},
        "special_tokens_map.json": special,
        "chat_template.jinja": LLAVA_CHAT_TEMPLATE,
        "processor_config.json": _processor_config(spec, IMAGE_TOKEN),
        "preprocessor_config.json": _image_settings(spec),
        "generation_config.json": {"bos_token_id": models.BOS_ID, "eos_token_id": models.EOS_ID,
                                   "pad_token_id": spec.pad_token_id},
    }


def real_tokenizer_files(spec) -> dict[str, str | dict]:
    """Processor files of a real-weight preset with SmolLM2's tokenizer (unchanged, from the GGUF): its
    ``image_token_id`` is one of the tokenizer's own unused special tokens, named in processor_config.json."""
    from vlmx.torch_ref import llava_micro

    tok = llava_micro.tokenizer()
    image_token = tok.convert_ids_to_tokens(spec.image_token_id)
    if tok.encode(image_token, add_special_tokens=False) != [spec.image_token_id]:
        raise ProcessorFilesError(f"preset {spec.name}: image_token_id {spec.image_token_id} ({image_token!r}) is "
                                  "not a single special token of its tokenizer; pick an unused special token")
    ids = {"bos_token": spec.bos_token_id, "eos_token": spec.eos_token_id, "pad_token": spec.pad_token_id,
           "unk_token": tok.unk_token_id}
    special = {k: tok.convert_ids_to_tokens(v) for k, v in ids.items() if v is not None}
    return {
        "tokenizer.json": tok.backend_tokenizer.to_str(),
        "tokenizer_config.json": {"tokenizer_class": "TokenizersBackend", **special, "add_bos_token": False,
                                  "add_eos_token": False, "clean_up_tokenization_spaces": False,
                                  "model_max_length": spec.max_seq_len},
        "special_tokens_map.json": special,
        "chat_template.jinja": chatml_image_template(image_token),
        "processor_config.json": _processor_config(spec, image_token),
        "preprocessor_config.json": _image_settings(spec),
        "generation_config.json": {"bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
                                   "pad_token_id": spec.pad_token_id},
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProcessorFilesError(f"{path} is not valid JSON ({e}); re-save it with save_pretrained") from None
