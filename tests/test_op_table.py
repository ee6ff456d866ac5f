"""The op table is the single source of truth: schemas, defaults and validation derive from it."""
import pytest
import torch

from vlmx.torch_ref import ops
from vlmx.torch_ref.op_table import OPS, get_op, markdown_table


def test_every_op_is_registered_with_the_generated_schema():
    for op in OPS.values():
        packet = getattr(torch.ops.vlmx, op.torch_name)
        schema = str(packet.default._schema)
        for t in op.inputs:
            assert t.name in schema
        for a in op.attrs:
            assert a.name in schema, (op.name, a.name, schema)
        assert len(packet.default._schema.returns) == len(op.outputs)


def test_validate_attrs_fills_defaults_and_rejects_bad_values():
    fa = get_op("FlashAttention")
    full = fa.validate_attrs({"num_heads": 4, "head_dim": 64})
    assert full["num_kv_heads"] == 0 and full["layout"] == "bsd" and full["window"] == -1
    with pytest.raises(ValueError, match="required"):
        fa.validate_attrs({"num_heads": 4})
    with pytest.raises(ValueError, match="choose one of"):
        fa.validate_attrs({"num_heads": 4, "head_dim": 64, "layout": "sbhd"})
    with pytest.raises(ValueError, match="unknown attribute"):
        fa.validate_attrs({"num_heads": 4, "head_dim": 64, "heads": 3})
    with pytest.raises(KeyError, match="not a vlmx op"):
        get_op("Conv")


def test_lookup_by_either_name_and_docs_list_every_op():
    assert get_op("flash_attention") is get_op("FlashAttention")
    md = markdown_table()
    for op in OPS.values():
        assert op.name in md and op.qualified_torch_name in md
    assert ops.call("QuantizePerToken", torch.randn(2, 8))[0].dtype == torch.int8


def test_targets_table():
    from vlmx.torch_ref.targets import DEFAULT_TARGET, get_target

    t = get_target(DEFAULT_TARGET)
    assert t.sm == 75 and t.compute_capability == (7, 5) and not t.bf16
    assert "-gencode=arch=compute_75,code=compute_75" in get_target("trt-sm90").gencode
    with pytest.raises(ValueError, match="choose one of trt-sm75"):
        get_target("trt-sm12")
