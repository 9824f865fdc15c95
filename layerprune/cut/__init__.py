"""Removing layers: from a checkpoint on disk or a loaded model (`surgery`), and from a GGUF file,
bytes copied (`gguf_surgery`).
"""
