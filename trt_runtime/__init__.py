"""vlmx.trt_runtime"""
