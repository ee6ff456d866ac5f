"""Placeholder until the exporter lands: replaced by `vlm-export --model llava-tiny`."""
print("vlmx demo: exporter not built yet")
