"""The residual stream and what is measured on it: hooks and running layers from a state
(`residual`), the angular-distance table and Block Influence (`analysis`, `streaming` layer by
layer for models larger than memory), KL divergence in chunks (`divergence`), and the cost ledger
(`cost`: seconds by phase, tokens through layers).
"""
