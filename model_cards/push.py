"""Push a training run to the Hub: the model with its code (loads with `trust_remote_code=True`), its card and
training-curve plot, and optionally a copy converted to transformers' own classes that loads without remote code.

Only the model is uploaded: `config.json`, the safetensors weights, the modeling code named in `auto_map`,
`preprocessor_config.json`, and the card and plot, which are regenerated from the run's files so the card always
matches what is pushed. Checkpoints, optimizer states and training arguments stay local.

The run directory is only read: the card lives in memory and the native copy is converted into a temporary
directory, so a push that fails anywhere leaves the run as it was. Missing files, a missing token and a failed
conversion all stop the push before its first request.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from deit_distill.training.run_record import SavedRun

from .card import render_card_files
from .run import CONFIG_FILE, PREPROCESSOR_FILE, code_files, weight_files

ONNX_FOLDER = "onnx"  # where `with_onnx` puts the exported files in the repo
NO_TOKEN_MESSAGE = (
    "No Hugging Face token found, and pushing needs one with write access. Log in with `huggingface-cli login` "
    "(`hf auth login` in recent versions), set the HF_TOKEN environment variable, or pass the token "
    "(`--hub_token` on the command line)."
)


class PushError(RuntimeError):
    """A push that did not happen, saying why and what to do."""


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_url: str
    native_commit_url: str | None = None  # set when a native copy was pushed


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    push_native: str | None = None,
    with_onnx: bool = False,
) -> PushResult:
    """Upload the model of `run_dir` to `repo_id` (created if missing, `private` then applies; `revision` is a
    branch, created from main if missing). `push_native` also pushes the transformers-native copy: a name
    containing "/" is another repo id (its main branch), anything else a branch of `repo_id`. `with_onnx` also
    exports the model to ONNX (fp32, checked against PyTorch, and dynamic int8) and pushes it under `onnx/`.

    Raises `FileNotFoundError` for an incomplete run and `PushError` when there is no token, the Hub cannot be
    reached or the Hub refuses a request.
    """
    native_repo_id, native_revision = None, None
    if push_native:
        native_repo_id, native_revision = (
            (push_native, None) if "/" in push_native else (repo_id, push_native)
        )
        if (native_repo_id, native_revision or "main") == (repo_id, revision or "main"):
            raise ValueError(
                f"push_native={push_native!r} is where the model itself goes; name another branch or repo."
            )
    run = SavedRun.read(run_dir)
    code = code_files(run)
    model_files = {
        name: run.path / name for name in [CONFIG_FILE, *weight_files(run), *code, PREPROCESSOR_FILE]
    }
    missing = [name for name, path in model_files.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run.path} lacks {', '.join(missing)}; save the model and its image processor there first."
        )
    token = token or get_token()
    if not token:
        raise PushError(NO_TOKEN_MESSAGE)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        native_files = _stage_native_copy(run, Path(staging)) if native_repo_id else {}
        onnx_files = _stage_onnx(run, Path(staging) / ONNX_FOLDER) if with_onnx else {}
        with _explain_hub_errors(api.endpoint):
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            # A bare name gets the token owner's namespace: the card and the commits need the full id.
            native_repo_id = repo_url.repo_id if native_repo_id == repo_id else native_repo_id
            repo_id = repo_url.repo_id
            card_files = render_card_files(
                run.path,
                repo_id=repo_id,
                revision=revision,
                native_repo_id=native_repo_id,
                native_revision=native_revision,
                onnx_folder=ONNX_FOLDER if with_onnx else None,
            )
            message = commit_message or f"Upload DeiT distillation run {run.path.resolve().name}"
            commit = _commit(api, repo_id, revision, {**model_files, **onnx_files, **card_files}, message)
        native_commit = None
        if native_repo_id:
            where = f"{native_repo_id}" + (f" (branch {native_revision})" if native_revision else "")
            try:
                with _explain_hub_errors(api.endpoint):
                    if native_repo_id != repo_id:
                        api.create_repo(native_repo_id, private=private, exist_ok=True)
                    # A branch starts as a copy of main: drop main's modeling code so the copy holds no remote code.
                    native_commit = _commit(
                        api,
                        native_repo_id,
                        native_revision,
                        {**native_files, **card_files},
                        f"{message} (transformers-native copy, no remote code)",
                        remove=code,
                    )
            except PushError as error:
                # Half a push: say what is on the Hub and what is not, so a rerun is an informed choice.
                raise PushError(
                    f"The model was pushed ({commit.commit_url}), but the transformers-native copy to {where} was "
                    f"not: {error} Pushing again repeats both (the model's commit is then empty)."
                ) from error
    return PushResult(str(repo_url), commit.commit_url, native_commit.commit_url if native_commit else None)


def _stage_native_copy(run: SavedRun, staging: Path) -> dict[str, Path | bytes]:
    """Convert with the model package's exporters into `staging`: transformers' DeiT-with-teacher, or ViT for a
    model without the distillation token."""
    from deit_distill.modeling_deit_distill import (
        DeiTDistillForImageClassification,
        to_transformers_deit,
        to_transformers_vit,
    )

    model = DeiTDistillForImageClassification.from_pretrained(run.path)
    convert = to_transformers_deit if model.config.use_distillation_token else to_transformers_vit
    convert(model).save_pretrained(staging)
    return {
        **{path.name: path for path in staging.iterdir()},
        PREPROCESSOR_FILE: run.path / PREPROCESSOR_FILE,
    }


def _stage_onnx(run: SavedRun, folder: Path) -> dict[str, Path]:
    """`deit-distill export`'s files for the run's model (with a dynamic int8 copy) in `folder`, keyed by their
    path in the repo. Runs before any request, so a missing onnx extra or a failed check stops the push."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from deit_distill.training.onnx_export import INT8_FILE, ONNX_FILE, export_onnx, quantize_int8

    model = AutoModelForImageClassification.from_pretrained(run.path, trust_remote_code=True)
    report = export_onnx(model, AutoImageProcessor.from_pretrained(run.path), folder, source=run.path.name)
    quantize_int8(folder / ONNX_FILE, folder / INT8_FILE, "dynamic")
    report.int8 = {"mode": "dynamic", "file": INT8_FILE}
    report.write(folder)
    return {f"{ONNX_FOLDER}/{path.name}": path for path in sorted(folder.iterdir())}


def _commit(
    api: HfApi,
    repo_id: str,
    branch: str | None,
    files: dict[str, Path | bytes],
    message: str,
    remove: list[str] | tuple[str, ...] = (),
) -> CommitInfo:
    """One commit adding `files` (a path is read, never written) and deleting those of `remove` that are there,
    on `branch`, created from main if missing."""
    if branch and branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    present = set(api.list_repo_files(repo_id, revision=branch)) if remove else set()
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(
            path_in_repo=name, path_or_fileobj=str(content) if isinstance(content, Path) else content
        )
        for name, content in sorted(files.items())
    ]
    operations += [CommitOperationDelete(path_in_repo=name) for name in sorted(present.intersection(remove))]
    return api.create_commit(repo_id, operations, commit_message=message, revision=branch)


@contextmanager
def _explain_hub_errors(endpoint: str) -> Iterator[None]:
    """Turn transport and HTTP failures into a `PushError` that names the endpoint and the server's answer."""
    try:
        yield
    except HfHubHTTPError as error:
        response = error.response
        status = response.status_code
        hint = (
            " Check that the token is valid and may write to this namespace." if status in (401, 403) else ""
        )
        request = f"{response.request.method} {response.url}"
        reason = error.server_message or str(error).splitlines()[0]
        raise PushError(f"The Hub at {endpoint} answered {status} to {request}: {reason}.{hint}") from error
    except httpx2.TransportError as error:
        raise PushError(
            f"Could not reach the Hub at {endpoint} ({error}). Check the network connection, or HF_ENDPOINT if it "
            "should point to a mirror or a local server."
        ) from error
