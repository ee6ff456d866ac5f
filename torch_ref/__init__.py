"""vlmx.torch_ref"""
