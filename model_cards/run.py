"""The model files of a saved run that a push uploads: the modeling code `trust_remote_code` needs and the
safetensors weights. What a run directory holds is defined once, in `deit_distill.training.run_record`
(`SavedRun`, `RunRecord`)."""

from __future__ import annotations

import json
from pathlib import Path

from deit_distill.training.run_record import CONFIG_FILE, SavedRun

PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

__all__ = ["CONFIG_FILE", "PREPROCESSOR_FILE", "code_files", "weight_files"]


def code_files(run: SavedRun) -> list[str]:
    """The Python files `trust_remote_code` needs: each module named in `auto_map` or `custom_pipelines` (the
    pipeline `attach_pipeline` adds) and what it imports relatively."""
    from transformers.dynamic_module_utils import get_relative_import_files

    references = list((run.config.get("auto_map") or {}).values())
    references += [task.get("impl") for task in (run.config.get("custom_pipelines") or {}).values()]
    modules = set()
    for reference in references:
        for ref in reference if isinstance(reference, list) else [reference]:
            # "other/repo--module.Class" points at code in another repo: nothing to ship from here.
            if ref and "--" not in ref:
                modules.add(ref.rsplit(".", 1)[0] + ".py")
    files = set(modules)
    for module in modules:
        if not (run.path / module).is_file():
            raise FileNotFoundError(
                f"config.json's auto_map or custom_pipelines names {module}, which is not in {run.path}."
            )
        files.update(Path(f).name for f in get_relative_import_files(run.path / module))
    return sorted(files)


def weight_files(run: SavedRun) -> list[str]:
    """The safetensors file, or the index and every shard it lists."""
    if (run.path / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    if (run.path / WEIGHTS_INDEX_FILE).is_file():
        index = json.loads((run.path / WEIGHTS_INDEX_FILE).read_text(encoding="utf-8"))
        return [WEIGHTS_INDEX_FILE, *sorted(set(index["weight_map"].values()))]
    raise FileNotFoundError(
        f"{run.path} has no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})."
    )
