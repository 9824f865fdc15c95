"""What a user asks for, composed from the parts below: choose layers then cut (`pipeline.prune`),
repair, heal, quantize or write GGUF (`export`); the single-layer sensitivity map (`sensitivity`).
"""
