"""`python -m layerprune` (and `accelerate launch -m layerprune heal ...`) runs the CLI."""

from .cli import main

main()
