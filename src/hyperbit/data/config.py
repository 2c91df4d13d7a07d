"""The data section of a run's configuration: which corpus, tokenised how."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, check_choice, check_types
from .sources import DECODE_ERRORS


@dataclass
class DataConfig:
    path: str = "pystdlib"  # corpus spec (pystdlib, a file, dir, glob, .jsonl, HF dataset dir)
    # or a directory prepared by `hyperbit prepare`
    tokenizer: str = "byte"  # "byte" or "bpe" (trained locally) or a saved tokenizer file
    vocab_size: int = 8192  # BPE only
    text_field: str = "text"  # JSON Lines / HF datasets
    val_fraction: float = 0.01  # non-pystdlib sources
    max_bytes: int = 0  # cap per split while preparing; 0 = everything
    decode_errors: str = "strict"  # text that is not UTF-8: "strict" (stop), "replace" (U+FFFD), "skip"

    def __post_init__(self) -> None:
        check_types(self)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_bytes < 0 or self.vocab_size < 2:
            raise ConfigError("data.max_bytes must be >= 0 and data.vocab_size >= 2")
        check_choice("data.decode_errors", self.decode_errors, DECODE_ERRORS)
