"""vlmx.apps: commands that chain the parts (torch_ref -> export -> plugins -> trt_runtime). They sit above all four
and may import any of them; no part imports ``vlmx.apps``."""
