"""Pushing a run to the Hub (the test server): exactly the model, its code, processor, card and plot go up; the
repo then works for a user who has only the libraries; a native copy loads without remote code; a push that
fails says why and leaves the run directory as it was."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hub_server import DEFAULT_TOKEN
from PIL import Image

from deit_distill.model_cards.card import render_card_files
from deit_distill.model_cards.push import push_run

REPO = "test-user/deit-push-e2e"
MODEL_FILES = {
    "config.json",
    "model.safetensors",
    "configuration_deit_distill.py",
    "modeling_deit_distill.py",
    "image_processing.py",  # a relative import of the modeling file
    "pipeline_deit_distill.py",  # the image-classification pipeline that decodes images as training does
    "preprocessor_config.json",
}
CARD_FILES = {"README.md", "training_curves.png"}

# Each push of PARAMS["pushes"] in turn, in one interpreter (importing torch once): the result or the error.
PUSH = """
import json
from deit_distill.model_cards.push import push_run
outcomes = []
for push in PARAMS["pushes"]:
    try:
        outcomes.append({"ok": vars(push_run(push["run"], push["repo"], **push["kwargs"]))})
    except Exception as error:
        outcomes.append({"error": {"type": type(error).__name__, "message": str(error)}})
print(json.dumps(outcomes))
"""
BRANCH_REPO, BRANCH_NATIVE_REPO = "test-user/deit-push-branch", "test-user/deit-push-branch-native"

# A user of the pushed repo: a clean interpreter in which this project cannot be imported.
USER = """
import contextlib, io, json, re
import torch
from PIL import Image
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModelForImageClassification, DeiTForImageClassificationWithTeacher

try:
    import deit_distill.modeling_deit_distill
    project_importable = True
except ImportError:
    project_importable = False

repo = PARAMS["repo"]
image = Image.open("image.jpg").convert("RGB")
processor = AutoImageProcessor.from_pretrained(repo)
pixels = processor(images=image, return_tensors="pt")
model = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True).eval()
native = DeiTForImageClassificationWithTeacher.from_pretrained(repo, revision="native").eval()
with torch.no_grad():
    remote_logits, native_logits = model(**pixels).logits, native(**pixels).logits

card = ModelCard.load(repo)
card.validate()
pipeline_snippet, native_snippet = re.findall(r"```python\\n(.*?)```", card.text, flags=re.DOTALL)
namespace = {}
exec(pipeline_snippet, namespace)
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    exec(native_snippet, {})

print(json.dumps({
    "project_importable": project_importable,
    "model_module": type(model).__module__,
    "remote_logits": remote_logits.tolist(),
    "native_logits": native_logits.tolist(),
    "eval_results": {f"{r.metric_name}": r.metric_value for r in card.data.eval_results},
    "pipeline_labels": [p["label"] for p in namespace["predictions"]],
    "native_printed": printed.getvalue().strip(),
}))
"""


def snapshot(run: Path) -> dict[str, str | None]:
    """Every path under the run with its content hash (None for folders)."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        for p in sorted(run.rglob("*"))
    }


def reference_logits(run: Path, image_path: Path) -> torch.Tensor:
    """The run's model, loaded with this project's classes, on the image the user script reads."""
    from transformers import AutoImageProcessor

    from deit_distill.modeling_deit_distill import DeiTDistillForImageClassification

    model = DeiTDistillForImageClassification.from_pretrained(run).eval()
    pixels = AutoImageProcessor.from_pretrained(run)(
        images=Image.open(image_path).convert("RGB"), return_tensors="pt"
    )
    with torch.no_grad():
        return model(**pixels).logits


def labels_by_index(run: Path) -> dict[int, str]:
    return {int(i): name for i, name in json.loads((run / "config.json").read_text())["id2label"].items()}


@pytest.fixture(scope="module")
def pushed(make_run, hub_client, tmp_path_factory) -> SimpleNamespace:
    """Two pushes: a run with a native branch to REPO, one to a private branch of BRANCH_REPO (named without its
    namespace) with the native copy in BRANCH_NATIVE_REPO; then one user session against REPO."""
    run, branch_run = make_run("deit-e2e"), make_run("deit-branch")
    before = snapshot(run)
    user_dir = tmp_path_factory.mktemp("user")
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(user_dir / "image.jpg", quality=95)
    pushes = [
        {"run": str(run), "repo": REPO, "kwargs": {"push_native": "native"}},
        {
            "run": str(branch_run),
            "repo": BRANCH_REPO.split("/")[1],  # a bare name: the token owner's namespace
            "kwargs": {"revision": "v1", "push_native": BRANCH_NATIVE_REPO, "private": True},
        },
    ]
    push, branch_push = hub_client(PUSH, {"pushes": pushes}, token=DEFAULT_TOKEN)
    user = hub_client(USER, {"repo": REPO}, clean=True, cwd=user_dir)
    reference = reference_logits(run, user_dir / "image.jpg")
    return SimpleNamespace(
        run=run, before=before, push=push, branch_push=branch_push, user=user, reference=reference
    )


def test_push_uploads_the_model_its_code_processor_card_and_plot_and_nothing_else(pushed, hub_server):
    stored = hub_server.files(REPO)
    assert set(stored) == MODEL_FILES | CARD_FILES | {
        ".gitattributes"
    }  # no checkpoint, optimizer or arguments
    for name in MODEL_FILES:
        assert stored[name] == (pushed.run / name).read_bytes()
    # The card is regenerated for the repo (its snippets name it), not read from the run directory.
    assert {n: stored[n] for n in CARD_FILES} == render_card_files(
        pushed.run, repo_id=REPO, native_revision="native"
    )
    assert pushed.push["ok"]["commit_url"].endswith(hub_server.branches(REPO)["main"])


def test_native_branch_holds_the_converted_model_and_no_remote_code(pushed, hub_server):
    stored = hub_server.files(REPO, "native")
    assert (
        set(stored)
        == {"config.json", "model.safetensors", "preprocessor_config.json", ".gitattributes"} | CARD_FILES
    )
    config = json.loads(stored["config.json"])
    assert config["model_type"] == "deit" and "auto_map" not in config
    assert config["architectures"] == ["DeiTForImageClassificationWithTeacher"]
    assert pushed.push["ok"]["native_commit_url"].endswith(hub_server.branches(REPO)["native"])


def test_pushed_repo_loads_with_trust_remote_code_alone_and_gives_the_same_logits(pushed):
    assert pushed.user["project_importable"] is False
    assert pushed.user["model_module"].startswith("transformers_modules.")  # the code came from the repo
    torch.testing.assert_close(torch.tensor(pushed.user["remote_logits"]), pushed.reference)


def test_native_copy_loads_without_remote_code_and_gives_the_average_head_logits(pushed):
    torch.testing.assert_close(
        torch.tensor(pushed.user["native_logits"]), pushed.reference, rtol=1e-4, atol=1e-5
    )


def test_card_snippets_run_as_written_and_answer_with_label_names(pushed):
    labels = labels_by_index(pushed.run)
    assert pushed.user["pipeline_labels"] and set(pushed.user["pipeline_labels"]) <= set(labels.values())
    assert pushed.user["native_printed"] == labels[int(pushed.reference.argmax())]


def test_pushed_card_loads_with_the_runs_metrics_and_passes_validation(pushed):
    metrics = json.loads((pushed.run / "eval_results.json").read_text())
    heads = {
        "cls": "CLS head",
        "dist": "DIST head",
        "avg": "CLS+DIST average",
    }  # the student's; not the teacher's
    measured = {
        f"{name} top-{k} accuracy": metrics[f"eval_{head}_top{k}"]
        for head, name in heads.items()
        for k in (1, 5)
    }
    assert pushed.user["eval_results"] == measured  # validate() ran in USER


def test_successful_push_leaves_the_run_directory_unchanged(pushed):
    assert snapshot(pushed.run) == pushed.before


def test_push_to_a_branch_of_a_bare_repo_name_with_the_native_copy_in_another_repo(pushed, hub_server):
    assert "ok" in pushed.branch_push, pushed.branch_push
    assert set(hub_server.files(BRANCH_REPO, "main")) == {".gitattributes"}
    assert set(hub_server.files(BRANCH_REPO, "v1")) == MODEL_FILES | CARD_FILES | {".gitattributes"}
    assert not any(name.endswith(".py") for name in hub_server.files(BRANCH_NATIVE_REPO))
    assert hub_server.is_private(BRANCH_REPO) and hub_server.is_private(BRANCH_NATIVE_REPO)
    card = hub_server.files(BRANCH_REPO, "v1")["README.md"].decode()
    assert f'model="{BRANCH_REPO}", revision="v1", trust_remote_code=True' in card
    assert f'DeiTForImageClassificationWithTeacher.from_pretrained("{BRANCH_NATIVE_REPO}")' in card


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no token", ["huggingface-cli login", "HF_TOKEN", "--hub_token"]),
        ("wrong token", ["answered 401", "Invalid credentials", "token is valid"]),
        ("server error", ["answered 500", "/commit/main", "storage backend unavailable"]),
        ("hub unreachable", ["Could not reach the Hub", "HF_ENDPOINT"]),
    ],
)
def test_failed_push_explains_itself_and_leaves_the_run_directory_unchanged(
    make_run, hub, hub_client, case, expected
):
    run = make_run("deit-fail")
    repo = f"test-user/deit-push-{case.replace(' ', '-')}"
    before = snapshot(run)
    token, env = {"no token": None, "wrong token": "hf_wrong"}.get(case, DEFAULT_TOKEN), {}
    if case == "server error":
        hub.inject_fault(500, "storage backend unavailable", method="POST", path=r"/commit/")
    if case == "hub unreachable":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    [result] = hub_client(
        PUSH, {"pushes": [{"run": str(run), "repo": repo, "kwargs": {"token": token}}]}, env=env
    )
    assert result["error"]["type"] == "PushError"
    for text in expected:
        assert text in result["error"]["message"]
    assert snapshot(run) == before
    assert not hub.repo_exists(repo) or set(hub.files(repo)) == {".gitattributes"}


def test_push_native_onto_the_models_own_branch_is_refused(make_run):
    with pytest.raises(ValueError, match="where the model itself goes"):
        push_run(
            make_run("deit-same-branch"), "test-user/deit-push-same", token=DEFAULT_TOKEN, push_native="main"
        )


def test_run_without_its_image_processor_is_refused(make_run):
    run = make_run("deit-incomplete")
    (run / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks preprocessor_config\.json"):
        push_run(run, "test-user/deit-push-incomplete", token=DEFAULT_TOKEN)


def test_cli_push_and_card_commands_reach_the_hub(make_run, hub_client, hub_server):
    run = make_run("cli-run")
    script = """
        import json, sys
        from deit_distill.training.commands.cli import main
        main(["card", PARAMS["run"]])
        main(["push", PARAMS["run"], "--repo-id", PARAMS["repo"], "--push-native", "native"])
        print(json.dumps("done"))
    """
    hub_client(script, {"run": str(run), "repo": "test-user/cli-push"}, token=DEFAULT_TOKEN)
    assert {"config.json", "model.safetensors", "README.md", "training_curves.png"} <= set(
        hub_server.files("test-user/cli-push")
    )
    assert "native" in hub_server.branches("test-user/cli-push")
    assert (run / "README.md").exists()  # `card` writes into the run; `push` does not modify it


def test_a_push_that_fails_half_way_says_what_was_pushed_and_what_was_not(make_run, hub, hub_client):
    run = make_run("deit-half")
    repo = "test-user/deit-push-half"
    # The model's commit to main goes through; the native copy's commit to its branch fails.
    hub.inject_fault(500, "storage backend unavailable", method="POST", path=r"/commit/native")
    [result] = hub_client(
        PUSH,
        {
            "pushes": [
                {"run": str(run), "repo": repo, "kwargs": {"token": DEFAULT_TOKEN, "push_native": "native"}}
            ]
        },
    )
    message = result["error"]["message"]
    assert result["error"]["type"] == "PushError"
    assert "The model was pushed" in message and "/commit/" in message
    assert f"transformers-native copy to {repo} (branch native) was not" in message
    assert "model.safetensors" in hub.files(repo)
