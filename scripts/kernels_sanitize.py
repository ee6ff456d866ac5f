"""compute-sanitizer memcheck subset for the vlmx kernels (run under `compute-sanitizer --tool memcheck`).

Small shapes that exercise every boundary path: odd lengths, split-KV decode, packed layout, padding masks, fully
masked rows, GEMM tails in M, N and K, and the fused output quantization. Exits 1 if any check fails numerically;
memcheck itself reports out-of-bounds accesses and sets its own exit code (--error-exitcode).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_checks import AttnCase, check_attention, check_gemm  # noqa: E402

from vlmx.plugins import cuda_ops  # noqa: E402

CASES = [
    AttnCase("s63_d80", 2, 63, 4, 80),
    AttnCase("s1_d72", 1, 1, 4, 72),
    AttnCase("decode_split_gqa", 1, 1, 8, 128, seqlen_k=777, num_kv_heads=2, causal=1),
    AttnCase("packed_causal_d96", 1, 100, 4, 96, num_kv_heads=2, causal=1, layout="packed"),
    AttnCase("padding_alibi", 2, 70, 4, 64, bias="padding", alibi=1),
    AttnCase("window_bias_bhsd", 1, 90, 2, 128, causal=1, window=20, bias="full", layout="bhsd"),
    AttnCase("fully_masked", 1, 40, 2, 64, seqlen_k=8, causal=1),
]


def main() -> int:
    ok = True
    for path in sys.argv[1:]:
        lib = cuda_ops.KernelLibrary(path)
        for c in CASES:
            r = check_attention(lib, c)
            print(f"{Path(path).name} {r['check']}: rel_err={r['rel_err']:.2e} {'OK' if r['ok'] else 'FAIL'}")
            ok &= r["ok"]
        for m, n, k in ((63, 130, 16), (129, 257, 80)):
            for r in check_gemm(lib, m, n, k):
                print(f"{Path(path).name} {r['check']}: {'OK' if r['ok'] else 'FAIL'}")
                ok &= r["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
