"""Where a model runs: the placement decision (device, dtype, dispatch or offload) and processes
(`devices`), memory available (`memory`), and loading a model argument onto them (`models`).
"""
