"""vlmx.plugins"""
