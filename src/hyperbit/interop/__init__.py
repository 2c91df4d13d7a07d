"""Leaving and entering the library: packed ternary inference files, the Hugging Face ``bitnet``
checkpoint format and Hugging Face Auto classes for every hyperbit model.

Format code works on models, configs and tokenizers; it knows nothing of run directories
(:mod:`hyperbit.runs` reads those and calls in here).
"""
