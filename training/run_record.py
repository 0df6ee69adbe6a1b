"""The run record: what a training run wrote down about itself, defined once and read by the card, the plot,
`eval` and the teacher cache.

`deit_distill_run.json` in the run directory holds these sections:
- `model`: the class, parameter count and the checkpoint the run started from;
- `data`: every `DataArguments` field (where the data came from), the seed that fixed the held-out split and the
  subsets, the evaluation split actually used, the image counts, and the augmentation settings;
- `distillation`: the loss settings and the teacher;
- `training`: the optimisation settings, and the epochs and steps actually trained;
- `card`: Hub ids for the model card's metadata (`base_model`, `dataset_id`, `teacher_id`); never local paths;
- `hardware`, `license`.
The final metrics are in `eval_results.json` (keys `eval_` + `deit_distill.training.evaluation.metric_key(...)`).

`SavedRun` is a whole run directory as its readers (the model card, the push) see it: the saved model's
`config.json`, this record, the final metrics and Trainer's log. It is the one definition of what a run holds; the
training entry point writes it (`make_run_record` in `deit_distill.training.commands.train`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .arguments import DataArguments, dataclass_from_dict
from .errors import MissingPathError, UserError

RUN_RECORD_FILE = "deit_distill_run.json"
EVAL_RESULTS_FILE = "eval_results.json"
CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.json"
# The embedded Fashion-MNIST (Debian's package) is the Hub's dataset of that name.
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"


@dataclass
class RunRecord:
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    distillation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    hardware: str | None = None
    license: str = "apache-2.0"

    def write(self, output_dir: str | os.PathLike) -> Path:
        path = Path(output_dir) / RUN_RECORD_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> RunRecord:
        """The record of a run directory.

        Raises:
            MissingPathError: The directory has no record (it is not a run of this project's `train`).
        """
        path = Path(run_dir) / RUN_RECORD_FILE
        if not path.is_file():
            raise MissingPathError(
                f"{run_dir} has no {RUN_RECORD_FILE}: it is not a training run of this project, so its data cannot "
                "be recalled; pass the dataset flags (--dataset_name, ...)."
            )
        values = _read_json(path)
        return cls(**{key: value for key, value in values.items() if key in cls.__dataclass_fields__})

    @staticmethod
    def exists(run_dir: str | os.PathLike) -> bool:
        return (Path(run_dir) / RUN_RECORD_FILE).is_file()

    def data_arguments(self) -> DataArguments:
        """The data arguments the run was trained with."""
        return dataclass_from_dict(DataArguments, self.data)

    @property
    def seed(self) -> int:
        """The seed that fixed the held-out split and the subsets."""
        return int(self.data.get("seed", 0))


def read_eval_results(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / EVAL_RESULTS_FILE
    return _read_json(path) if path.is_file() else None


@dataclass(frozen=True)
class SavedRun:
    """A saved run directory: the model's config, the run record (empty when the model was saved another way),
    the final metrics (`None` when the run was never evaluated) and Trainer's `log_history`."""

    path: Path
    config: dict[str, Any]
    record: RunRecord
    metrics: dict[str, Any] | None
    log_history: list[dict[str, Any]]

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> SavedRun:
        """Raises `FileNotFoundError` when `run_dir` holds no saved model, `UserError` for a damaged file."""
        path = Path(run_dir)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a saved model: it has no {CONFIG_FILE}.")
        state_path = path / TRAINER_STATE_FILE
        state = _read_json(state_path) if state_path.is_file() else {}
        return cls(
            path=path,
            config=_read_json(path / CONFIG_FILE),
            record=RunRecord.read(path) if RunRecord.exists(path) else RunRecord(),
            metrics=read_eval_results(path),
            log_history=state.get("log_history") or [],
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); the run directory is damaged.") from error


def hub_dataset_id(dataset_name: str) -> str | None:
    """The Hub id of a dataset argument, or `None` for a local folder."""
    if dataset_name == "fashion_mnist":
        return FASHION_MNIST_HUB_ID
    return None if is_local(dataset_name) else dataset_name


def hub_model_id(name: str | None) -> str | None:
    """`name` when it is a Hub model id (`owner/name`), `None` for a local path."""
    if not name or is_local(name) or name.count("/") != 1:
        return None
    return name


def is_local(name: str) -> bool:
    """Whether `name` is a path on this machine rather than a Hub id."""
    return name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name))
