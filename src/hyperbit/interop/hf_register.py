"""Registering hyperbit with ``transformers``' Auto classes, without importing ``transformers``.

``import hyperbit`` calls :func:`install`. Importing ``transformers`` costs seconds (its Auto
configuration module about one, its modelling code several), so nothing is imported here: an
import hook waits for ``transformers.models.auto.configuration_auto`` (loaded by ``AutoConfig``,
``AutoTokenizer``, ...) to register :class:`~.hf_config.HyperbitConfig` with ``AutoConfig``, and
for ``transformers.models.auto.modeling_auto`` (``AutoModelForCausalLM``) to register
:class:`~.hf_auto.HyperbitForCausalLM`. Modules already imported when hyperbit is imported are
registered at once. Without ``transformers`` installed nothing happens.

:func:`write_hf` is the ``hf`` export writer, importing :mod:`.hf_auto` only when called.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError

CONFIG_MODULE = "transformers.models.auto.configuration_auto"
MODEL_MODULE = "transformers.models.auto.modeling_auto"

__all__ = ["install", "write_hf"]


def _register_config() -> None:
    from .hf_config import register_config

    register_config()


def _register_model() -> None:
    from .hf_auto import register_model

    register_model()


ACTIONS: dict[str, Callable[[], None]] = {CONFIG_MODULE: _register_config, MODEL_MODULE: _register_model}


def _run(name: str) -> None:
    """Register for the Auto module ``name``; a failure is a warning, never a broken import."""
    try:
        ACTIONS[name]()
    except Exception as e:  # noqa: BLE001 - an incompatible transformers must not break its import
        warnings.warn(f"hyperbit could not register its Hugging Face Auto classes ({type(e).__name__}: "
                      f"{e}); use hyperbit.interop.hf_auto directly", stacklevel=2)


class _Loader(importlib.abc.Loader):
    """Runs the wrapped loader, then the registration for the module."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _run(self.name)

    def __getattr__(self, attr: str) -> Any:  # get_source, get_filename, ... of the wrapped loader
        return getattr(self.loader, attr)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the two Auto modules with the other finders and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in ACTIONS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Register now for the Auto modules already imported; hook the others' first import."""
    loaded = sys.modules.get("transformers", False)
    if loaded is None or (loaded is False and importlib.util.find_spec("transformers") is None):
        return  # not installed (or its import blocked)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in ACTIONS:
        if name in sys.modules:
            _run(name)


def write_hf(model, run_config, tokenizer, info: dict[str, Any], out_dir: str | Path) -> None:
    """The ``hf`` export writer (:func:`.hf_auto.write_hf`); needs ``transformers``."""
    try:
        from .hf_auto import write_hf as writer
    except ImportError as e:
        raise ConfigError(f"--format hf needs transformers ({e}); install it with "
                          "pip install 'hyperbit[hf]'") from None
    writer(model, run_config, tokenizer, info, out_dir)
