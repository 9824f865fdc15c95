"""The paper's experiment: fractions x strategies x repairs x healed, each point evaluated against the
full model on the same documents (`run`), and its report (`report`).
"""
