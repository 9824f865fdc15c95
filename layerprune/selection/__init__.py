"""Which layers to remove: the strategy registry (`strategies`) and the loss-scored searches
(`scoring`). Choosing knows nothing of writing checkpoints.
"""
