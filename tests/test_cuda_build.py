"""CPU tests of the kernel build and the C ABI marshalling (no GPU needed: cudart is linked statically).

The all-targets compile is marked ``nvcc`` and ``slow`` and skips with a reason when nvcc is missing.
"""
import ctypes
import subprocess

import pytest

from vlmx.plugins import build as kbuild
from vlmx.plugins import cuda_ops
from vlmx.torch_ref.targets import TARGETS

NO_NVCC = "needs nvcc (CUDA toolkit) on PATH, in $CUDA_HOME/bin or as $NVCC"


def test_gencode_flags_follow_the_target_table():
    assert kbuild.gencode_flags("trt-sm86") == ["-gencode=arch=compute_86,code=sm_86",
                                               "-gencode=arch=compute_75,code=compute_75"]
    assert kbuild.gencode_flags("trt-sm90", ptx_only=True) == ["-gencode=arch=compute_75,code=compute_75"]
    assert "-cudart=static" in kbuild.BASE_FLAGS and "--resource-usage" in kbuild.BASE_FLAGS
    assert kbuild.library_name("trt-sm75") == "libvlmx_kernels_sm75.so"
    with pytest.raises(ValueError, match="choose one of"):
        kbuild.gencode_flags("trt-sm12")


def test_cache_key_covers_flags_and_defines(monkeypatch):
    monkeypatch.setattr(kbuild, "_nvcc_version", lambda nvcc: "nvcc 13.0")
    keys = {kbuild.cache_key("trt-sm75", False, "nvcc"), kbuild.cache_key("trt-sm75", True, "nvcc"),
            kbuild.cache_key("trt-sm86", False, "nvcc"),
            kbuild.cache_key("trt-sm75", False, "nvcc", ("VLMX_FA_SMALL_D_MIN_BLOCKS=3",))}
    assert len(keys) == 4
    assert kbuild.cache_key("trt-sm75", False, "nvcc") == kbuild.cache_key("trt-sm75", False, "nvcc")


def test_importing_plugins_does_nothing():
    code = "import sys, vlmx.plugins; assert 'vlmx.plugins.cuda_ops' not in sys.modules, sorted(sys.modules)"
    subprocess.run([kbuild.sys.executable, "-c", code], check=True)


def test_params_struct_matches_the_header_layout():
    # 5 pointers, 6 ints, 15 int64 strides, float scale, 4 ints, workspace pointer + int64 bytes: offsets as a C
    # compiler lays them out.
    p = cuda_ops.AttentionParams
    assert p.batch.offset == 40 and p.head_dim.offset == 60 and p.q_stride_b.offset == 64
    assert p.bias_stride_q.offset == 64 + 14 * 8 and p.scale.offset == 184 and p.alibi_bias_max.offset == 200
    assert p.workspace.offset == 208 and p.workspace_bytes.offset == 216 and ctypes.sizeof(p) == 224


@pytest.fixture(scope="module")
def sm75_lib():
    if not kbuild.has_nvcc():
        pytest.skip(NO_NVCC)
    return cuda_ops.KernelLibrary(kbuild.build("trt-sm75", verbose=False))


@pytest.mark.nvcc
def test_header_struct_size_agrees_with_ctypes(tmp_path):
    if not kbuild.has_nvcc():
        pytest.skip(NO_NVCC)
    nvcc = kbuild.find_nvcc()
    src = tmp_path / "size.cu"
    src.write_text('#include "vlmx_kernels.h"\n#include <stddef.h>\n#include <stdio.h>\nint main(){printf("%zu %zu %zu %zu",'
                   ' sizeof(vlmx_attention_params), offsetof(vlmx_attention_params, scale), '
                   'offsetof(vlmx_attention_params, bias_stride_q), offsetof(vlmx_attention_params, workspace_bytes));}\n')
    exe = tmp_path / "size"
    subprocess.run([nvcc, f"-I{kbuild.CSRC}", "-o", str(exe), str(src)], check=True, capture_output=True)
    size, scale_off, bias_q_off, ws_off = map(int, subprocess.run([str(exe)], capture_output=True,
                                                                  text=True).stdout.split())
    p = cuda_ops.AttentionParams
    assert (size, scale_off, bias_q_off, ws_off) == (ctypes.sizeof(p), p.scale.offset, p.bias_stride_q.offset,
                                                     p.workspace_bytes.offset)


@pytest.mark.nvcc
def test_split_kv_workspace_size_is_host_only_monotone_and_capped(sm75_lib):
    """The caller sizes split-KV scratch (TensorRT getWorkspaceSize at the profile maximum): 0 when keys are too
    few to split, non-decreasing in every size, capped at 32 MiB; no GPU needed."""
    def ws(**kw):
        base = dict(batch=1, seqlen_q=1, seqlen_k=1000, num_heads=32, num_kv_heads=1, head_dim=128)
        return sm75_lib.flash_attention_workspace_size(cuda_ops.AttentionParams(**{**base, **kw}))

    decode = ws()
    assert decode == 64 * 32 * (128 + 2) * 4  # 64 splits x H32 x (D + 2) floats
    assert ws(seqlen_k=127) == 0 and ws(seqlen_k=128) > 0
    sizes = [ws(batch=b, seqlen_q=q, seqlen_k=k) for b, q, k in [(1, 1, 128), (1, 1, 4096), (2, 1, 4096), (2, 64, 4096),
                                                                 (8, 577, 4096)]]
    assert sizes == sorted(sizes) and sizes[-1] == 32 << 20


@pytest.mark.nvcc
@pytest.mark.parametrize("head_dim,status,match", [(65, cuda_ops.UNSUPPORTED, "head_dim 65 is not supported"),
                                                   (256, cuda_ops.UNSUPPORTED, "expected one of 64, 72, 80, 96, 128")])
def test_launcher_rejects_unsupported_head_dim_before_any_cuda_call(sm75_lib, head_dim, status, match):
    p = cuda_ops.AttentionParams(head_dim=head_dim, batch=1, seqlen_q=1, seqlen_k=1, num_heads=1, num_kv_heads=1)
    assert sm75_lib.flash_attention_raw(p, None) == status
    assert match in sm75_lib.last_error()


@pytest.mark.nvcc
@pytest.mark.parametrize("change,status,match", [
    (dict(q=0), cuda_ops.INVALID_ARGUMENT, "must be device pointers"),
    (dict(seqlen_k=0), cuda_ops.INVALID_ARGUMENT, "sizes must be positive"),
    (dict(num_heads=6, num_kv_heads=4), cuda_ops.INVALID_ARGUMENT, "must divide num_heads"),
    (dict(window=-2), cuda_ops.INVALID_ARGUMENT, "window=-2"),
    (dict(q=0x1008), cuda_ops.MISALIGNED, "16-byte aligned"),
    (dict(k_stride_s=100), cuda_ops.MISALIGNED, "multiples of 8"),
    (dict(alibi=1, alibi_bias_max=0), cuda_ops.INVALID_ARGUMENT, "alibi_bias_max"),
    (dict(workspace=0x5004, workspace_bytes=4096), cuda_ops.INVALID_ARGUMENT, "workspace"),
])
def test_launcher_argument_checks(sm75_lib, change, status, match):
    fields = dict(q=0x1000, k=0x2000, v=0x3000, o=0x4000, batch=2, seqlen_q=8, seqlen_k=8, num_heads=4,
                  num_kv_heads=2, head_dim=64, q_stride_s=256, k_stride_s=128, v_stride_s=128, o_stride_s=256,
                  q_stride_h=64, k_stride_h=64, v_stride_h=64, o_stride_h=64, window=-1, alibi_bias_max=8)
    fields.update(change)
    assert sm75_lib.flash_attention_raw(cuda_ops.AttentionParams(**fields), None) == status
    assert match in sm75_lib.last_error()


@pytest.mark.nvcc
def test_gemm_argument_checks(sm75_lib):
    assert sm75_lib.int8_gemm_raw(0x1000, 0x2000, 0x3000, 4, 4, 24, None) == cuda_ops.INVALID_ARGUMENT
    assert "multiple of 16" in sm75_lib.last_error()
    assert sm75_lib.int8_gemm_raw(0x1001, 0x2000, 0x3000, 4, 4, 32, None) == cuda_ops.MISALIGNED
    assert sm75_lib.int8_gemm_raw(0x1000, 0x2000, 0x3000, 0, 4, 32, None) == cuda_ops.INVALID_ARGUMENT
    assert sm75_lib.w8a8_raw(0x1000, 0x2000, 0x3000, 0x4000, None, 0x5000, 0x6000, None, 4, 4, 32, None) == \
        cuda_ops.INVALID_ARGUMENT
    assert "y_q_scale" in sm75_lib.last_error()
    assert sm75_lib.w8a8_raw(0x1000, None, 0x3000, 0x4000, None, 0x5000, None, None, 4, 4, 32, None) == \
        cuda_ops.INVALID_ARGUMENT


@pytest.mark.nvcc
def test_library_needs_no_dynamic_cudart(sm75_lib):
    out = subprocess.run(["ldd", str(sm75_lib.path)], capture_output=True, text=True).stdout
    assert "libcudart" not in out, out


@pytest.mark.nvcc
def test_build_is_cached_by_content(tmp_path):
    if not kbuild.has_nvcc():
        pytest.skip(NO_NVCC)
    first = kbuild.build("trt-sm75", out_dir=tmp_path, ptx_only=True, verbose=False)
    mtime = first.stat().st_mtime_ns
    assert kbuild.build("trt-sm75", out_dir=tmp_path, ptx_only=True, verbose=False) == first
    assert first.stat().st_mtime_ns == mtime
    entries = kbuild.fatbin_entries(first)
    assert entries and all(kind == "ptx" and sm == 75 for kind, sm, _ in entries), entries


@pytest.mark.nvcc
@pytest.mark.slow
def test_every_target_compiles(tmp_path, capsys):
    if not kbuild.has_nvcc():
        pytest.skip(NO_NVCC)
    libs = kbuild.build_all(out_dir=tmp_path, verbose=True, jobs=2)
    assert set(libs) == set(TARGETS)
    log = capsys.readouterr().out
    for name, path in libs.items():
        assert path.exists() and path.stat().st_size > 0
        sm = TARGETS[name].sm
        entries = kbuild.fatbin_entries(path)
        assert {(k, a) for k, a, _ in entries} == {("sass", sm), ("ptx", 75)}, (name, entries)
    assert " 0 B spill stores" in log and "flash_fwd_kernel<D=72,W=8>" in log
