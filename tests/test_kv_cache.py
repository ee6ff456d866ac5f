"""The fixed-size KV cache at the op level: FlashAttention's kv_len input (reference kernel, ONNX function body),
the tensor_scatter op and ONNX Runtime's in-place TensorScatter, the LM graph's static decode step, memory plans."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh

from test_export_helpers import assert_close, run, single_op_model
from vlmx.torch_ref import kv_cache
from vlmx.torch_ref import reference as R
from vlmx.torch_ref.op_table import OPS


def _randn(*shape, dtype=np.float32):
    return np.random.default_rng().standard_normal(shape).astype(dtype)  # fresh inputs every run


KV_CASES = [  # (B, Sq, S_max, H, Hkv, D, kv_len per row, attrs)
    (2, 1, 16, 4, 4, 8, [5, 9], dict(causal=1)),           # decode step
    (2, 3, 16, 4, 2, 16, [3, 11], dict(causal=1)),         # prefill chunk after a past, GQA
    (1, 4, 12, 4, 4, 8, [4], dict(causal=1, alibi=1)),     # MPT prefill
    (2, 1, 20, 8, 1, 16, [7, 20], dict(causal=1, alibi=1)),  # MQA decode, one row at S_max
]


@pytest.mark.parametrize("b,sq,smax,h,hkv,d,lens,extra", KV_CASES)
def test_kv_len_reads_only_the_valid_prefix(b, sq, smax, h, hkv, d, lens, extra):
    """Reference with kv_len == plain attention on the cache sliced to kv_len (row by row); garbage beyond kv_len
    does not matter; the ONNX body agrees."""
    q, k, v = _randn(b, h, sq, d), _randn(b, hkv, smax, d), _randn(b, hkv, smax, d)
    kv_len = np.asarray(lens, np.int64)
    attrs = OPS["FlashAttention"].validate_attrs(dict(num_heads=h, num_kv_heads=hkv, head_dim=d, layout="bhsd",
                                                      **extra))
    out = R.flash_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), None,
                            torch.from_numpy(kv_len), **attrs)
    for row, n in enumerate(lens):
        ref = R.flash_attention(*(torch.from_numpy(t[row:row + 1, :, :n] if t is not q else t[row:row + 1])
                                  for t in (q, k, v)), **attrs)
        assert_close(out[row:row + 1].numpy(), ref.numpy(), "fp32_exact_math", f"row {row}, kv_len {n}")
    k2 = k.copy()
    k2[0, :, lens[0]:] = 1e4  # garbage in unused slots
    out2 = R.flash_attention(torch.from_numpy(q), torch.from_numpy(k2), torch.from_numpy(v), None,
                             torch.from_numpy(kv_len), **attrs)
    torch.testing.assert_close(out2, out)
    model, feed = single_op_model("FlashAttention", [q, k, v, None, kv_len], attrs)
    (body,) = run(model, feed)
    assert_close(body, out.numpy(), "fp32_exact_math", f"ONNX body {extra}")


def test_tensor_scatter_reference_and_in_place_write():
    past = torch.from_numpy(_randn(2, 3, 10, 4))
    upd = torch.from_numpy(_randn(2, 3, 2, 4))
    wi = torch.tensor([0, 7])
    out = torch.ops.vlmx_onnx.tensor_scatter(past, upd, wi)
    want = past.clone()
    want[0, :, 0:2], want[1, :, 7:9] = upd[0], upd[1]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    ptr = past.data_ptr()
    assert kv_cache.write_(past, upd, wi) is past and past.data_ptr() == ptr
    torch.testing.assert_close(past, want, rtol=0, atol=0)


def test_onnxruntime_tensor_scatter_updates_a_shared_buffer_in_place(capfd):
    """past and present bound to one OrtValue: written in place (no copy warning), same pointer every step."""
    node = oh.make_node("TensorScatter", ["past", "upd", "wi"], ["present"], axis=2)
    g = oh.make_graph([node], "g", [oh.make_tensor_value_info("past", TP.FLOAT, [1, 2, 32, 4]),
                                    oh.make_tensor_value_info("upd", TP.FLOAT, [1, 2, 1, 4]),
                                    oh.make_tensor_value_info("wi", TP.INT64, [1])],
                      [oh.make_tensor_value_info("present", TP.FLOAT, [1, 2, 32, 4])])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 24)])
    m.ir_version = 10
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    buf = np.zeros((1, 2, 32, 4), np.float32)
    cache = ort.OrtValue.ortvalue_from_numpy(buf)
    rows = _randn(5, 1, 2, 1, 4)
    for step in range(5):
        io = sess.io_binding()
        io.bind_ortvalue_input("past", cache)
        io.bind_ortvalue_output("present", cache)
        io.bind_cpu_input("upd", rows[step])
        io.bind_cpu_input("wi", np.array([step], np.int64))
        sess.run_with_iobinding(io)
        assert cache.data_ptr() == buf.ctypes.data
    np.testing.assert_array_equal(buf[0, :, :5], rows[:, 0, :, 0].transpose(1, 0, 2))
    assert not buf[0, :, 5:].any()
    assert "in-place optimization not activated" not in capfd.readouterr().err


@pytest.mark.parametrize("preset", ["llava-tiny", "llava-mpt-tiny"])
def test_static_decode_step_equals_the_graph(preset):
    """The torch backend's CUDA-graph step (context-independent shapes) computes what the exported graph does."""
    from vlmx.export.model_configs import ExportContext, family_for
    from vlmx.torch_ref import models

    spec = models.get_preset(preset)
    fam = family_for(spec)
    model = fam.prepare(models.build_model(spec, seed=2), "plugin")
    ctx = ExportContext(model, spec, "plugin", torch.float32, 0, max_seq_len=32)
    lm, step = fam.lm_module(ctx), fam.lm_module(ctx, inplace=True)
    d = fam.lm_dims(model)
    caches = [torch.zeros(1, d["num_kv_heads"], 32, d["head_dim"]) for _ in range(2 * d["num_layers"])]
    prompt = torch.randn(1, 6, d["lm_hidden"]) * 0.5
    with torch.no_grad():
        _, *caches = lm(prompt, torch.ones(1, 6, dtype=torch.int64), *caches)
        token = torch.randn(1, 1, d["lm_hidden"]) * 0.5
        want, *present = lm(token, torch.ones(1, 7, dtype=torch.int64), *caches)
        got = step.step(token, torch.tensor([6]), torch.ones(1, 32, dtype=torch.int64), *caches)
    assert_close(got.numpy(), want.numpy(), "fp32_exact_math", f"{preset} static step logits")
    for c, p in zip(caches, present):  # written in place
        torch.testing.assert_close(c, p, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ memory plan
def test_memory_plan_refuses_llava_7b_at_full_context_on_a_t4_and_says_what_fits():
    from vlmx.trt_runtime.memory_plan import GIB, MemoryPlanError, preset_plan

    p = preset_plan("llava", "t4")
    print(p.text())
    assert p.max_seq_len == 4096 and p.kv_cache == 2 * GIB and not p.fits
    s = p.largest_seq_len()
    assert 1024 <= s < 4096 and p.at(s).fits and not p.at(s + 64).fits
    with pytest.raises(MemoryPlanError, match=rf"does not fit on Tesla T4.*--max-seq-len {s} or less"):
        p.check()
    assert preset_plan("llava", "t4", max_seq_len=1024).check().fits
    with pytest.raises(MemoryPlanError, match="weights alone do not fit"):
        preset_plan("llava", "rtx2060", max_seq_len=1024).check()
    assert preset_plan("llava-tiny", "rtx2060").fits


def test_memory_plan_of_an_export_counts_cache_at_s_max():
    from vlmx.trt_runtime.memory_plan import MemoryPlanError, check_build_memory, plan

    info = {"num_layers": 2, "num_kv_heads": 4, "head_dim": 32, "lm_hidden": 128, "num_heads": 4,
            "vocab_size": 1024, "max_seq_len": 512, "dtype": "float16"}
    manifest = {"model_info": info, "attention": "plugin",
                "files": {"lm.onnx": {"bytes": 10_000}, "lm.onnx.data": {"bytes": 5_000}, "report.json": {"bytes": 7}}}
    p = plan(manifest, 15_000, 1 << 40, "test")
    assert p.kv_cache == 2 * 2 * 4 * 32 * 512 * 2 and p.weights == 15_000
    assert check_build_memory(manifest, "rtx2060", 75, verbose=False).fits
    with pytest.raises(MemoryPlanError, match="--card gtx1080 is not known"):
        check_build_memory(manifest, "gtx1080", 75)


@pytest.mark.parametrize("value, match", [("1", "outside 2..512"), ("600", "outside 2..512"),
                                          ("16", "leaves no room for text")])
def test_max_seq_len_flag_is_checked_before_exporting(tmp_path, capsys, value, match):
    from vlmx.export.cli import main as export_main

    out = tmp_path / "e"
    assert export_main(["--model", "llava-tiny", "--max-seq-len", value, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--max-seq-len" in err and match in err and "Traceback" not in err
    assert not out.exists()
