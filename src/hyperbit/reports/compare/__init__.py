"""hyperbit compare: train a grid of runs and report on them."""
