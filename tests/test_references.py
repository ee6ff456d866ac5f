"""reference.npz: traced-size arrays padded on access, written one array at a time (deflated), read by numpy."""
import numpy as np

from vlmx.export.references import GraphReference, pad_axis, save_references


def test_padding_on_access_and_npz_round_trip(tmp_path):
    rng = np.random.default_rng()
    past = rng.standard_normal((2, 4, 5, 8)).astype(np.float16)
    present = rng.standard_normal((2, 4, 5, 8)).astype(np.float16)
    logits = rng.standard_normal((2, 3, 50)).astype(np.float32)
    s_max = 300
    ref = GraphReference({"past.0.key": past, "ids": np.arange(6).reshape(2, 3)},
                         {"logits": logits, "present.0.key": present},
                         {"past.0.key": (2, s_max), "present.0.key": (2, s_max)})
    got = ref["inputs"]["past.0.key"]
    assert got.shape == (2, 4, s_max, 8) and got.dtype == np.float16
    assert np.array_equal(got[:, :, :5], past) and not got[:, :, 5:].any()
    assert ref["outputs"]["logits"] is logits  # unpadded arrays pass through untouched
    path = tmp_path / "reference.npz"
    save_references(path, {"lm": ref, "vision": GraphReference({"px": logits}, {})})
    with np.load(path) as z:
        assert sorted(z.files) == ["lm.ids", "lm.logits", "lm.past.0.key", "lm.present.0.key", "vision.px"]
        assert np.array_equal(z["lm.present.0.key"], pad_axis(present, 2, s_max))
        assert np.array_equal(z["lm.logits"], logits) and z["lm.ids"].dtype == np.int64
    raw = 2 * past.itemsize * 2 * 4 * s_max * 8  # the two padded caches alone, uncompressed
    assert path.stat().st_size < raw / 4
