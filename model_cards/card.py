"""The model card of a training run: Hub metadata with a model-index of the measured accuracies, and a body
describing the model, its distillation, training settings and data handling, results, curves, usage and
limitations.

Every statement on the card is read from the run directory (`deit_distill.training.run_record.SavedRun`: the
saved config, the run record training wrote, `eval_results.json`, Trainer's log); a setting the run did not record
is left out rather than guessed.

Metadata choices:
- `model-index` holds this model's results only: one `accuracy` result per head the model has (CLS, DIST, their
  average) and k, named after the head (e.g. "DIST head top-5 accuracy") with `args: {top_k: k}`; values are
  fractions, as in `eval_results.json`. The teacher's accuracy on the same split is in the body only, labelled as
  the teacher's. The index needs a dataset id, so a run on a local dataset gets its results in the body only.
- Metadata holds Hub ids only, from the run record's `card` section: `base_model` is the checkpoint the run
  started from, `datasets` the dataset, `teacher_model` the teacher (each set by `train` when it was a Hub id, or
  by `--card_base_model`, `--card_dataset_id`, `--card_teacher_id`). In the body a Hub id is linked, and a local
  model, dataset or cache is named by its folder name and said to be local: no path of the training machine.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from deit_distill.training.data import EVAL_SPLIT_CANDIDATES
from deit_distill.training.run_record import SavedRun

from .plot import has_training_curves, plot_training_curves
from .run import PREPROCESSOR_FILE, code_files

CARD_FILE = "README.md"
PLOT_FILE = "training_curves.png"
TEMPLATE = Path(__file__).with_name("template.md")
TAGS = ["deit", "distillation", "vision-transformer", "image-classification"]
# This model's heads, as `eval_results.json` names them (`eval_{head}_top{k}`); the teacher's are `eval_teacher_*`.
HEADS = {"cls": "CLS head", "dist": "DIST head", "avg": "CLS+DIST average"}

# Label of each recorded setting, in display order. A setting not listed is shown under its own key (a field added
# to the record later), so every label here must be a key that `make_run_record` writes (tests check it).
DISTILLATION_LABELS = {
    "distillation_type": "type",
    "alpha": "alpha (weight of the teacher term)",
    "tau": "tau (temperature)",
    "kl_reduction": "KL normalisation",
    "teacher": "teacher",
    "teacher_cache": "teacher outputs read from",
}
HYPERPARAMETER_LABELS = {
    "train_split": "train split",
    "num_train_examples": "training images",
    "unlabeled_dataset": "unlabelled images from (distillation term only)",
    "unlabeled_split": "unlabelled split",
    "num_unlabeled_examples": "of which unlabelled",
    "augmentation": "augmentation",
    "augment_on": "augmentation runs on (workers or device)",
    "mixup": "mixup alpha",
    "cutmix": "cutmix alpha",
    "mixup_prob": "probability of mixing a batch",
    "mixup_switch_prob": "probability of CutMix over Mixup",
    "label_smoothing": "label smoothing",
    "repeated_augmentations": "repeated augmentations (copies per image and epoch)",
}
DATA_HANDLING_LABELS = {
    "image_column": "image column",
    "label_column": "label column",
    "unlabeled_image_column": "image column of the unlabelled images",
    "max_train_samples": "training images drawn (stratified, at most)",
    "max_eval_samples": "evaluation images drawn (stratified, at most)",
    "max_unlabeled_samples": "unlabelled images drawn (at most)",
    "eval_fraction": "share of the train split held out for evaluation",
    "verify_images": "every image decoded once before training",
    "on_corrupt_image": "a corrupt image",
    "allow_classes_without_training_images": "classes without training images kept",
}
TRAINING_LABELS = {
    "learning_rate": "learning rate",
    "per_device_train_batch_size": "batch size per device",
    "gradient_accumulation_steps": "gradient accumulation steps",
    "world_size": "processes",
    "global_batch_size": "global batch size",
    "layer_decay": "layer-wise lr decay",
    "epochs": "epochs trained",
    "steps": "optimizer steps",
    "weight_decay": "weight decay",
    "warmup_steps": "warmup steps",  # "warmup ratio" for a value in (0, 1): see `_warmup_label`
    "lr_scheduler_type": "learning-rate schedule",
    "optimizer": "optimizer",
    "seed": "seed",
    "mixed_precision": "mixed precision",
}
ON_CORRUPT_IMAGE = {"raise": "stops the run with an error naming its file", "skip": "is skipped and counted"}
# Shown elsewhere or not at all: the dataset in its own row, the eval split with the results, the seed under
# training (the same value fixes the split and the subsets).
_DATA_SHOWN_ELSEWHERE = (
    "dataset_name",
    "dataset_config",
    "eval_split",
    "eval_split_used",
    "num_eval_examples",
    "seed",
)
# Soft-only settings: a hard or label-only run may record them, but they did not act.
_SOFT_ONLY = ("tau", "kl_reduction")
# Settings of unlabelled images: every run records their defaults, which mean nothing without --unlabeled_dataset.
_UNLABELED_ONLY = (
    "unlabeled_split",
    "unlabeled_image_column",
    "max_unlabeled_samples",
    "num_unlabeled_examples",
)
_MIXING_ONLY = ("mixup_prob", "mixup_switch_prob")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)  # settings print their shortest exact form, e.g. 0.0005


def _pct(fraction: Any) -> str:
    return f"{100 * fraction:.2f}" if isinstance(fraction, (int, float)) else "n/a"


def _rows(
    section: dict[str, Any], labels: dict[str, str], skip: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """(label, value) of each recorded setting: the labelled ones in order, then the others under their key."""
    recorded = {key: value for key, value in section.items() if value is not None and key not in skip}
    known = [(label, _value(recorded[key])) for key, label in labels.items() if key in recorded]
    return known + [(key, _value(value)) for key, value in recorded.items() if key not in labels]


def _warmup_label(value: Any) -> str:
    """transformers reads a `warmup_steps` in (0, 1) as a share of the optimizer steps."""
    return (
        "warmup ratio (of the optimizer steps)"
        if isinstance(value, float) and 0 < value < 1
        else "warmup steps"
    )


def _local_name(path: str) -> str:
    """The folder name of a path of the training machine (never the whole path)."""
    return PurePath(str(path).rstrip("/\\")).name or str(path)


def _reference(name: str | None, hub_id: str | None, what: str, hub_kind: str = "") -> str | None:
    """A Hub id linked, or a local path named by its folder and said to be local; `None` when there is neither."""
    if hub_id:
        return f"[`{hub_id}`](https://huggingface.co/{hub_kind}{hub_id})"
    if name:
        return f"`{_local_name(name)}` (a local {what}, not on the Hub)"
    return None


class _Facts:
    """Everything the card states, derived once from the run."""

    def __init__(self, run: SavedRun, repo_id: str | None):
        self.run = run
        record = run.record
        self.model_name = repo_id.split("/")[-1] if repo_id else run.path.resolve().name
        self.data = record.data
        self.distillation = record.distillation
        self.training = record.training
        self.dataset = self.data.get("dataset_name")
        self.dataset_id = record.card.get("dataset_id")
        self.teacher_id = record.card.get("teacher_id")
        self.base_model = record.card.get("base_model")
        self.kind = self.distillation.get("distillation_type")
        self.teacher = _reference(self.distillation.get("teacher"), self.teacher_id, "model")
        self.metrics = run.metrics or {}
        self.id2label = run.config.get("id2label") or {}
        self.has_dist_token = run.config.get("use_distillation_token", True)
        self.inference_head = run.config.get("inference_head", "average" if self.has_dist_token else "cls")
        model_type = run.config.get("model_type", "deit_distill")
        # The heads this model has: a convnet or a DeiT without the DIST token has one, reported as `cls`.
        self.heads = (
            HEADS
            if model_type == "deit_distill" and self.has_dist_token
            else {"cls": HEADS["cls"] if model_type == "deit_distill" else "Model"}
        )

    def accuracy(self, head: str, k: int) -> Any:
        return self.metrics.get(f"eval_{head}_top{k}")

    def eval_split(self) -> str | None:
        """The evaluation split as the Hub dataset names it; `None` for a part held out of the train split."""
        split = self.data.get("eval_split_used") or self.data.get("eval_split")
        return split if split in (self.data.get("eval_split"), *EVAL_SPLIT_CANDIDATES) else None

    def eval_results(self) -> list[EvalResult]:
        if not self.dataset_id:
            return []
        return [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=self.dataset_id,
                dataset_name=self.dataset_id,
                dataset_config=self.data.get("dataset_config"),
                dataset_split=self.eval_split(),
                metric_type="accuracy",
                metric_value=self.accuracy(head, k),
                metric_name=f"{self.heads[head]} top-{k} accuracy",
                metric_args={"top_k": k},
            )
            for head in self.heads
            for k in (1, 5)
            if isinstance(self.accuracy(head, k), (int, float))
        ]

    def dataset_text(self) -> str:
        if not self.dataset_id:
            return _reference(self.dataset, None, "dataset") or "an unrecorded dataset"
        config = self.data.get("dataset_config")
        shown = f"`{self.dataset}`" if self.dataset and self.dataset != self.dataset_id else ""
        link = _reference(None, self.dataset_id, "dataset", "datasets/")
        return (f"{shown} ({link})" if shown else link) + (f", config `{config}`" if config else "")

    def evaluated_on(self) -> str:
        split = self.data.get("eval_split_used") or self.data.get("eval_split")
        size = self.data.get("num_eval_examples")
        text = f"the `{split}` split of " if split else ""
        text += self.dataset_text() if self.dataset else "the run's evaluation data"
        return text + (f", {_value(size)} images" if size else "")

    def summary(self) -> str:
        token = (
            "with a distillation token"
            if self.has_dist_token
            else "without a distillation token (a plain ViT)"
        )
        teacher = f" from {self.teacher}" if self.teacher else ""
        how = {
            "hard": f" with hard distillation{teacher}",
            "soft": f" with soft distillation{teacher}",
            "none": " without distillation",
        }.get(self.kind, "")
        where = f" on {self.dataset_text()}" if self.dataset else ""
        model_type = self.run.config.get("model_type", "deit_distill")
        if model_type == "deit_distill":
            text = f"A DeiT image classifier {token}"
        else:  # e.g. a convnet teacher trained with the same entry point
            text = f"A `{model_type}` image classifier"
        text += f", trained{how}{where}." if how or where else "."
        if self.kind not in ("hard", "soft", "none"):
            text += " The run did not record its distillation settings."
        if self.id2label:
            text += f" It predicts {len(self.id2label)} classes."
        outputs = {
            "average": "the average of the CLS and DIST heads, the paper's class + distillation row",
            "cls": "the CLS head's",
            "distillation": "the DIST head's",
        }
        if model_type != "deit_distill":
            return text
        head = self.inference_head
        return text + f" Its `logits` (config `inference_head: {head}`) are {outputs.get(head, head)}."

    def architecture(self) -> list[tuple[str, str]]:
        config, model = self.run.config, self.run.record.model
        rows = [("model class", f"`{model['architecture']}`")] if model.get("architecture") else []
        if self.base_model:
            rows.append(("base model", _reference(None, self.base_model, "checkpoint")))
        elif "start_format" in model:
            started = _reference(model.get("started_from"), None, "checkpoint")
            rows.append(("started from", started or "scratch (random initialisation)"))
        rows += [
            (label, _value(config[key]))
            for key, label in (
                ("image_size", "image size"),
                ("patch_size", "patch size"),
                ("hidden_size", "width"),
                ("num_hidden_layers", "depth"),
                ("num_attention_heads", "attention heads"),
                ("intermediate_size", "MLP width"),
                ("use_distillation_token", "distillation token"),
                ("inference_head", "inference head"),
            )
            if key in config
        ]
        if self.id2label:
            rows.append(("classes", _value(len(self.id2label))))
        if "num_parameters" in model:
            rows.append(("parameters", _value(model["num_parameters"])))
        return rows

    def distillation_rows(self) -> list[tuple[str, str]]:
        shown = {
            **self.distillation,
            "teacher": self.teacher,
            "teacher_cache": _reference(self.distillation.get("teacher_cache"), None, "teacher cache"),
        }
        rows = _rows(shown, DISTILLATION_LABELS, skip=() if self.kind == "soft" else _SOFT_ONLY)
        rows = [(label, value.strip("`") if label == "type" else value) for label, value in rows]
        if self.kind == "none":
            rows = [row for row in rows if row[0] in ("type", "teacher")]
        return rows

    def training_rows(self) -> list[tuple[str, str]]:
        rows = [("dataset", self.dataset_text())] if self.dataset else []
        skip = _DATA_SHOWN_ELSEWHERE + tuple(DATA_HANDLING_LABELS)
        skip += () if self.data.get("unlabeled_dataset") else _UNLABELED_ONLY
        skip += () if self.data.get("mixup") or self.data.get("cutmix") else _MIXING_ONLY
        data = dict(self.data)
        if data.get("unlabeled_dataset"):
            data["unlabeled_dataset"] = self._data_source(data["unlabeled_dataset"])
        rows += _rows(data, HYPERPARAMETER_LABELS, skip=skip)
        warmup = _warmup_label(self.training.get("warmup_steps"))
        rows += [
            (warmup if label == TRAINING_LABELS["warmup_steps"] else label, value)
            for label, value in _rows(self.training, TRAINING_LABELS)
        ]
        if self.run.record.hardware:
            rows.append(("hardware", str(self.run.record.hardware)))
        return rows

    def _data_source(self, name: str) -> str:
        if name == self.dataset:
            return "the training data's own split"
        if name.startswith((".", "/", "~")) or "\\" in name:
            return _reference(name, None, "dataset") or name
        return f"`{name}`"

    def data_handling_rows(self) -> list[tuple[str, str]]:
        data = {key: self.data.get(key) for key in DATA_HANDLING_LABELS}
        if not self.data.get("unlabeled_dataset"):
            for key in _UNLABELED_ONLY:
                data.pop(key, None)
        if self.eval_split() is not None or not self.data:
            data.pop("eval_fraction")  # the dataset's own eval split was used: nothing was held out
        if data.get("on_corrupt_image") in ON_CORRUPT_IMAGE:
            data["on_corrupt_image"] = ON_CORRUPT_IMAGE[data["on_corrupt_image"]]
        return _rows(data, DATA_HANDLING_LABELS)

    def results(self) -> list[tuple[str, str, str]]:
        return [
            (self.heads[head], _pct(self.accuracy(head, 1)), _pct(self.accuracy(head, 5)))
            for head in self.heads
            if self.accuracy(head, 1) is not None or self.accuracy(head, 5) is not None
        ]

    def result_notes(self) -> list[str]:
        notes = []
        teacher = [_pct(self.accuracy("teacher", k)) for k in (1, 5)]
        if any(value != "n/a" for value in teacher):
            notes.append(
                f"On the same images the teacher (not this model) scored {teacher[0]}% top-1 and {teacher[1]}% "
                "top-5."
            )
        if isinstance(self.metrics.get("eval_agreement"), (int, float)):
            agreement = _pct(self.metrics["eval_agreement"])
            notes.append(
                f"The student's top-1 prediction matches the teacher's on {agreement}% of the images."
            )
        if self.distillation.get("teacher_cache") and self.kind in ("hard", "soft"):
            notes.append(
                "The run read its teacher's outputs from a cache, so it was evaluated without a teacher: the eval "
                "loss is the labels' cross-entropy on both heads."
            )
        if isinstance(self.metrics.get("eval_loss"), (int, float)):
            notes.append(f"Eval loss: {self.metrics['eval_loss']:.2f}.")
        if self.results() and not self.dataset_id:
            notes.append(
                "The dataset has no Hub id (a local dataset, or a run that did not record it), so these results "
                "are not in the card's `model-index`."
            )
        return notes

    def limitations(self) -> list[str]:
        seed = self.training.get("seed")
        run = f"a single run (seed {seed})" if seed is not None else "a single run"
        lines = [
            f"The results come from {run} on {self.evaluated_on()}; they are not ImageNet numbers and do not "
            "compare with the paper's tables."
            if self.results()
            else "The model was not evaluated; measure it on your own data before relying on it."
        ]
        if self.id2label:
            lines.append(
                f"It only knows the {len(self.id2label)} training classes; another label set needs a new head and "
                "fine-tuning."
            )
        if self.kind in ("hard", "soft"):
            lines.append(
                "The DIST head learned to imitate the teacher, so it inherits the teacher's mistakes and biases."
            )
        lines.append(
            f"Inputs must be preprocessed as `{PREPROCESSOR_FILE}` says (resize, centre crop, normalisation); "
            "another resolution needs the position embedding interpolated."
        )
        lines.append(
            "transformers' `DeiTForImageClassificationWithTeacher` is inference-only: training or fine-tuning with a "
            "teacher needs this project's code."
        )
        return lines


def generate_model_card(
    run_dir: str | Path,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    native_repo_id: str | None = None,
    native_revision: str | None = None,
    onnx_folder: str | None = None,
) -> ModelCard:
    """The card of a run. `repo_id`/`revision` are where the model is (or will be) pushed and go into the usage
    snippets; a native (no remote code) copy is described when `native_repo_id` or `native_revision` is given
    (`native_repo_id` defaults to `repo_id`, `native_revision` to the main branch), and the ONNX export when
    `onnx_folder` (its folder in the repo) is."""
    run = SavedRun.read(run_dir)
    facts = _Facts(run, repo_id)
    eval_results = facts.eval_results()
    card_data = ModelCardData(
        license=run.record.license or "apache-2.0",
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=TAGS,
        datasets=[facts.dataset_id] if facts.dataset_id else None,
        base_model=facts.base_model,
        metrics=["accuracy"] if eval_results else None,
        model_name=facts.model_name if eval_results else None,  # the model-index's name; alone it is noise
        eval_results=eval_results or None,
        teacher_model=facts.teacher_id,
    )
    repo = repo_id or f"<your-namespace>/{facts.model_name}"
    native_repo = (native_repo_id or repo) if (native_repo_id or native_revision) else None
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=facts.model_name,
        summary=facts.summary(),
        architecture=facts.architecture(),
        distillation=facts.distillation_rows(),
        training=facts.training_rows(),
        data_handling=facts.data_handling_rows(),
        results=facts.results(),
        results_on=f"on {facts.evaluated_on()}",
        result_notes=facts.result_notes(),
        plot_file=PLOT_FILE if has_training_curves(run.log_history) else None,
        code_files=code_files(run),
        repo_id=repo,
        revision_arg=_revision_arg(revision),
        native_repo_id=native_repo,
        native_revision_arg=_revision_arg(native_revision),
        native_where=f"`{native_repo}`" + (f" (branch `{native_revision}`)" if native_revision else ""),
        native_class=native_model_class(run.config),
        inference_head=facts.inference_head,
        onnx_folder=onnx_folder,
        limitations=facts.limitations(),
    )


def native_model_class(config: dict[str, Any]) -> str:
    """The transformers class of the no-remote-code copy: DeiT with teacher head, or ViT without the DIST token."""
    return (
        "DeiTForImageClassificationWithTeacher"
        if config.get("use_distillation_token", True)
        else "ViTForImageClassification"
    )


def _revision_arg(revision: str | None) -> str:
    return f', revision="{revision}"' if revision and revision != "main" else ""


def render_card_files(
    run_dir: str | Path,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    native_repo_id: str | None = None,
    native_revision: str | None = None,
    onnx_folder: str | None = None,
) -> dict[str, bytes]:
    """`README.md` and, when the run logged anything, `training_curves.png`, as bytes; nothing is written.
    The arguments are those of `generate_model_card`."""
    card = generate_model_card(
        run_dir,
        repo_id=repo_id,
        revision=revision,
        native_repo_id=native_repo_id,
        native_revision=native_revision,
        onnx_folder=onnx_folder,
    )
    files = {CARD_FILE: str(card).encode("utf-8")}
    plot = plot_training_curves(SavedRun.read(run_dir).log_history)
    if plot is not None:
        files[PLOT_FILE] = plot
    return files


def write_model_card(
    run_dir: str | Path,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    native_repo_id: str | None = None,
    native_revision: str | None = None,
) -> Path:
    """Write `README.md` and the training-curve plot into the run directory; returns the card's path.
    The arguments are those of `generate_model_card`."""
    files = render_card_files(
        run_dir,
        repo_id=repo_id,
        revision=revision,
        native_repo_id=native_repo_id,
        native_revision=native_revision,
    )
    for name, content in files.items():
        (Path(run_dir) / name).write_bytes(content)
    return Path(run_dir) / CARD_FILE
