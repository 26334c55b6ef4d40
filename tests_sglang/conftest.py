"""The SGLang tests (`make test-sglang`, in the SGLang venv): SGLang 0.5.23's own code reads the export.

SGLang cannot serve on this CPU, but the parts that read an export run here: the page hash
(``get_hash_str``, a C++ extension built on first use with g++ and OpenSSL), the file backend
(``HiCacheFile``) and the host KV pool (``MHATokenToKVPoolHost``), which the hierarchical cache
fills from those files.

One shim: importing the host pool imports every model config SGLang knows, and two vision ones
import torchvision at module level. PyPI's torchvision is a CUDA build that fails to load beside the
CPU torch, so an empty placeholder stands in for it (nothing on the path under test uses it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Placeholder(types.ModuleType):
    """A module whose every attribute is another placeholder (for ``from torchvision.x import Y``)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return _Placeholder(f"{self.__name__}()")


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Placeholder(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        module.__version__ = "0.0.0"  # transformers parses it; an old version turns its torchvision paths off


try:
    import torchvision  # noqa: F401
except Exception:  # absent, or the CUDA build that cannot load beside the CPU torch
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _TorchvisionPlaceholder())
