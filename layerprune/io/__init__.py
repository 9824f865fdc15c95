"""Files: validated safetensors headers, shards and records (`checkpoint`), strict GGUF reading
(`gguf_reading`), model cards (`model_card`), and one policy for every output: locks, kill-safe
publish, overlap with inputs (`destinations`).
"""
