"""`python -m layerprune` (and `accelerate launch -m layerprune heal ...`) runs the CLI."""

from layerprune.cli import main

main()
