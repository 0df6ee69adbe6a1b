"""What a saved training run directory holds, as the card and the push read it (the training entry point writes it).

- model: `config.json` (with `auto_map`), safetensors weights, the modeling code, `preprocessor_config.json`;
- `trainer_state.json` (Trainer's, for `log_history`), `eval_results.json` (final metrics, optional),
  `deit_distill_run.json` (data, distillation and training settings; every field optional).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deit_distill.training.run_record import EVAL_RESULTS_FILE, RUN_RECORD_FILE

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TRAINER_STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]
    info: dict[str, Any]  # deit_distill_run.json, {} when absent
    metrics: dict[str, Any] | None  # eval_results.json, None when the run was never evaluated
    log_history: list[dict[str, Any]]

    def section(self, name: str) -> dict[str, Any]:
        """A sub-dict of the run info (`model`, `data`, `distillation`, `training`), {} when absent."""
        value = self.info.get(name)
        return value if isinstance(value, dict) else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def read_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a saved model: it has no {CONFIG_FILE}.")
    optional = {
        name: _read_json(path / name) if (path / name).is_file() else None
        for name in (RUN_RECORD_FILE, EVAL_RESULTS_FILE, TRAINER_STATE_FILE)
    }
    state = optional[TRAINER_STATE_FILE] or {}
    return Run(
        path=path,
        config=_read_json(path / CONFIG_FILE),
        info=optional[RUN_RECORD_FILE] or {},
        metrics=optional[EVAL_RESULTS_FILE],
        log_history=state.get("log_history") or [],
    )


def code_files(run: Run) -> list[str]:
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


def weight_files(run: Run) -> list[str]:
    """The safetensors file, or the index and every shard it lists."""
    if (run.path / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    if (run.path / WEIGHTS_INDEX_FILE).is_file():
        shards = sorted(set(_read_json(run.path / WEIGHTS_INDEX_FILE)["weight_map"].values()))
        return [WEIGHTS_INDEX_FILE, *shards]
    raise FileNotFoundError(
        f"{run.path} has no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})."
    )
