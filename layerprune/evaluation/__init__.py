"""How good a model is: lm-eval QA accuracy offline, held-out loss and kld (`harness`, one object
per kind of task in `tasks`), many variants side by side on each batch (`one_pass`), paired
intervals (`uncertainty`), and inference speed (`speed`).
"""
