"""vlmx.export"""
