"""The test Hub server, driven by the real huggingface_hub client (in a fresh interpreter pointed at it with
HF_ENDPOINT): what the client uploads is what the server stores, and what it downloads is what was uploaded."""

from __future__ import annotations

import re

from hub_server import DEFAULT_TOKEN

PRELUDE = """
import json, pathlib, tempfile
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

api = HfApi(token=PARAMS.get("token"))

def failure(call):
    try:
        call()
    except Exception as error:
        response = getattr(error, "response", None)
        return {"type": type(error).__name__, "status": getattr(response, "status_code", None), "message": str(error)}
    return None
"""


def test_uploaded_folder_downloads_identically_with_tree_info_and_snapshot(hub, hub_client):
    result = hub_client(
        PRELUDE
        + """
folder = pathlib.Path(tempfile.mkdtemp())
(folder / "sub").mkdir()
(folder / "config.json").write_text('{"a": 1}')
(folder / "sub" / "notes.txt").write_bytes(b"\\x00binary\\xff")
url = api.create_repo("srv-roundtrip")
commit = api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message="add files")
info = api.model_info(url.repo_id)
snapshot = pathlib.Path(snapshot_download(url.repo_id))
print(json.dumps({
    "repo_id": url.repo_id,
    "commit": commit.oid,
    "sha": info.sha,
    "siblings": sorted(s.rfilename for s in info.siblings),
    "top": sorted((type(e).__name__, e.path) for e in api.list_repo_tree(url.repo_id)),
    "all": sorted((type(e).__name__, e.path) for e in api.list_repo_tree(url.repo_id, recursive=True)),
    "notes": pathlib.Path(hf_hub_download(url.repo_id, "sub/notes.txt")).read_bytes().hex(),
    "snapshot": sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()),
}))
""",
        {"token": DEFAULT_TOKEN},
    )
    assert result["repo_id"] == "test-user/srv-roundtrip"  # no namespace given: the token's user
    assert re.fullmatch(r"[0-9a-f]{40}", result["commit"]) and result["sha"] == result["commit"]
    stored = hub.files("test-user/srv-roundtrip")
    assert stored["config.json"] == b'{"a": 1}' and stored["sub/notes.txt"] == b"\x00binary\xff"
    assert result["siblings"] == sorted(stored) == result["snapshot"]
    files = [["RepoFile", ".gitattributes"], ["RepoFile", "config.json"]]
    assert result["top"] == [*files, ["RepoFolder", "sub"]]
    assert result["all"] == [*files, ["RepoFile", "sub/notes.txt"], ["RepoFolder", "sub"]]
    assert bytes.fromhex(result["notes"]) == b"\x00binary\xff"


def test_create_repo_conflicts_unless_exist_ok_and_reuploads_of_unchanged_files_make_no_commit(
    hub, hub_client
):
    result = hub_client(
        PRELUDE
        + """
api.create_repo("srv-exists")
again = api.create_repo("test-user/srv-exists", exist_ok=True)
conflict = failure(lambda: api.create_repo("test-user/srv-exists"))
first = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id="test-user/srv-exists")
second = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id="test-user/srv-exists")
print(json.dumps({"again": again.repo_id, "conflict": conflict, "first": first.oid, "second": second.oid}))
""",
        {"token": DEFAULT_TOKEN},
    )
    assert result["again"] == "test-user/srv-exists"
    assert result["conflict"]["status"] == 409
    # preupload returns the stored oid, so the client sees the file unchanged and commits nothing.
    commits = [
        entry for entry in hub.log if entry[:2] == ("POST", "/api/models/test-user/srv-exists/commit/main")
    ]
    assert len(commits) == 1
    assert result["first"] == result["second"] == hub.branches("test-user/srv-exists")["main"]


def test_branch_gets_its_own_commits_and_main_is_untouched(hub, hub_client):
    result = hub_client(
        PRELUDE
        + """
repo = api.create_repo("srv-branch").repo_id
api.create_branch(repo, branch="native")
api.create_branch(repo, branch="native", exist_ok=True)
duplicate = failure(lambda: api.create_branch(repo, branch="native"))
api.upload_file(path_or_fileobj=b"native", path_in_repo="only-on-branch.txt", repo_id=repo, revision="native")
missing_on_main = failure(lambda: hf_hub_download(repo, "only-on-branch.txt"))
content = pathlib.Path(hf_hub_download(repo, "only-on-branch.txt", revision="native")).read_text()
refs = api.list_repo_refs(repo)
print(json.dumps({
    "duplicate": duplicate, "missing_on_main": missing_on_main, "content": content,
    "branches": {b.name: b.target_commit for b in refs.branches},
}))
""",
        {"token": DEFAULT_TOKEN},
    )
    assert result["duplicate"]["status"] == 409
    assert result["missing_on_main"]["type"] == "RemoteEntryNotFoundError"
    assert result["content"] == "native"
    assert result["branches"] == hub.branches("test-user/srv-branch")
    assert "only-on-branch.txt" not in hub.files("test-user/srv-branch", "main")


def test_writes_need_a_valid_token(hub, hub_client):
    result = hub_client(
        PRELUDE
        + """
no_token = failure(lambda: HfApi(token=False).create_repo("srv-auth"))
wrong_token = failure(lambda: HfApi(token="hf_wrong").create_repo("srv-auth"))
print(json.dumps({"no_token": no_token, "wrong_token": wrong_token}))
"""
    )
    assert result["no_token"]["status"] == 401 and "authenticated" in result["no_token"]["message"]
    assert (
        result["wrong_token"]["status"] == 401 and "Invalid credentials" in result["wrong_token"]["message"]
    )
    assert not hub.repo_exists("test-user/srv-auth")


def test_private_repo_reads_as_missing_without_token(hub, hub_client):
    result = hub_client(
        PRELUDE
        + """
repo = api.create_repo("srv-private", private=True).repo_id
api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo)
anonymous = HfApi(token=False)
print(json.dumps({
    "info": failure(lambda: anonymous.model_info(repo)),
    "download": failure(lambda: hf_hub_download(repo, "s.txt", token=False)),
    "with_token": pathlib.Path(hf_hub_download(repo, "s.txt", token=PARAMS["token"])).read_text(),
    "private": api.model_info(repo).private,
}))
""",
        {"token": DEFAULT_TOKEN},
    )
    assert hub.is_private("test-user/srv-private") and result["private"] is True
    assert result["info"]["type"] == "RepositoryNotFoundError" and result["info"]["status"] == 401
    assert result["download"]["type"] == "RepositoryNotFoundError"
    assert result["with_token"] == "secret"


def test_missing_repo_revision_and_file_raise_their_client_errors(hub, hub_client):
    result = hub_client(
        PRELUDE
        + """
repo = api.create_repo("srv-missing").repo_id
print(json.dumps({
    "repo": failure(lambda: hf_hub_download("test-user/srv-nowhere", "a.txt")),
    "revision": failure(lambda: hf_hub_download(repo, ".gitattributes", revision="no-such-branch")),
    "file": failure(lambda: hf_hub_download(repo, "no-such-file.txt")),
}))
""",
        {"token": DEFAULT_TOKEN},
    )
    assert result["repo"]["type"] == "RepositoryNotFoundError"
    assert result["revision"]["type"] == "RevisionNotFoundError"
    assert result["file"]["type"] == "RemoteEntryNotFoundError"


def test_card_validation_accepts_a_valid_card_and_names_what_is_wrong_in_a_malformed_one(hub, hub_client):
    result = hub_client(
        PRELUDE
        + """
from huggingface_hub import EvalResult, ModelCardData
good = ModelCard.from_template(ModelCardData(
    license="apache-2.0", library_name="transformers", base_model="facebook/deit-tiny-patch16-224",
    model_name="m", eval_results=[EvalResult(task_type="image-classification", dataset_type="cifar10",
    dataset_name="CIFAR-10", metric_type="accuracy", metric_value=0.5, metric_name="top-1")],
))
good.validate()
bad = ModelCard(
    "---\\nlicense: Apache 2.0\\nbase_model: /home/me/teacher\\nmodel-index:\\n- name: m\\n  results:\\n"
    "  - task: {type: image-classification}\\n    dataset: {type: c, name: C}\\n    metrics:\\n"
    "    - {type: accuracy, value: null}\\n---\\nbody"
)
repo = api.create_repo("srv-card").repo_id
good.push_to_hub(repo, token=PARAMS["token"])
print(json.dumps({
    "bad": failure(bad.validate),
    "bad_push": failure(lambda: bad.push_to_hub(repo, token=PARAMS["token"])),
    "loaded": [r.metric_value for r in ModelCard.load(repo).data.eval_results],
}))
""",
        {"token": DEFAULT_TOKEN},
    )
    assert result["bad"]["type"] == "ValueError"
    for complaint in ('"license"', '"base_model"', '"model-index[0].results[0].metrics[0].value"'):
        assert complaint in result["bad"]["message"]
    assert result["bad_push"]["type"] == "ValueError"
    assert result["loaded"] == [0.5]
    assert b"Apache 2.0" not in hub.files("test-user/srv-card")["README.md"]


def test_injected_fault_reaches_the_client_with_status_and_message_then_clears(hub, hub_client):
    hub.inject_fault(503, "Hub is under maintenance", method="POST", path=r"/commit/", times=1)
    result = hub_client(
        PRELUDE
        + """
repo = api.create_repo("srv-fault").repo_id
upload = lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
print(json.dumps({"first": failure(upload), "second": failure(upload)}))
""",
        {"token": DEFAULT_TOKEN},
    )
    assert result["first"]["status"] == 503 and "Hub is under maintenance" in result["first"]["message"]
    assert result["second"] is None
    assert hub.files("test-user/srv-fault")["x.txt"] == b"x"
