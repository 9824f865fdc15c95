"""Giving back what a cut took: a linear map fitted on calibration data and folded into the kept
weights (`repair`), and (Q)LoRA healing with optional distillation, then merged (`lora`).
"""
