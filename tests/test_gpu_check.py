"""bench/gpu_check.py keeps working without a GPU: its --smoke mode runs every section on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["correctness", "training", "data_feed", "inference"]


def test_gpu_check_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {}
    assert results["sections_done"] == SECTIONS
    assert results["meta"]["profile"] == "smoke"

    correctness = results["correctness"]
    assert correctness["passed"], correctness["checks"]
    assert set(correctness["losses"]) == {"eager, sdpa", "eager, eager attention", "compiled, sdpa"}
    assert all(len(losses) == correctness["steps"] for losses in correctness["losses"].values())
    assert any("compiled, sdpa vs eager, sdpa" in check["check"] for check in correctness["checks"])

    training = results["training"]
    modes = {(row["model"], row["mode"], row["student"], row["teacher"]) for row in training["rows"]}
    assert ("DeiT-S", "student only", "compiled", "-") in modes
    assert ("DeiT-S", "live teacher", "compiled", "NCHW") in modes
    assert any(mode[1] == "teacher only" for mode in modes)
    assert all(row["images_per_s"] > 0 and row["ms_per_step"] > 0 for row in training["rows"])
    # The student trained from a teacher cache: its row is there, and nothing was skipped or failed.
    assert ("DeiT-S", "teacher cache", "compiled", "cached logits") in modes
    assert "teacher cache" not in training["skipped_or_failed"]

    feed = results["data_feed"]
    assert [row["workers"] for row in feed["rows"]] == [0, 2]
    assert all(row["images_per_s"] > 0 for row in feed["rows"])
    assert set(feed["per_image_ms_one_thread"]) == {"decode", "decode + transform"}
    assert len(feed["step_rates"]) == sum(row["mode"] != "teacher only" for row in training["rows"])

    (row,) = results["inference"]["rows"]
    assert (row["variant"], row["batch"], row["dtype"]) == ("tiny", 1, "float32")
    assert all(row[f"{name}_img_s"] > 0 for name in ("ours", "transformers", "timm"))

    markdown = (out / "results.md").read_text()
    for heading in ("## Correctness", "## Training throughput", "## Data feed", "## Inference"):
        assert heading in markdown
    assert "FAIL" not in markdown
