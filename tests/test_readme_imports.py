"""Every import the README shows works as written, in a clean interpreter started from a folder that cannot see the
repository's own folders (only the installed `deit_distill` package); and the project's packages neither shadow
nor are shadowed by a user's own `training` and `model_cards` packages next to their script."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def readme_imports() -> list[str]:
    """Each import statement of the README as written: those of its Python blocks (parsed) and those quoted inline
    in its text (`from x import y`)."""
    statements = []
    for block in PYTHON_BLOCKS:
        for node in ast.parse(block).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                statements.append(ast.get_source_segment(block, node))
    text = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    statements += re.findall(r"`((?:from [\w.]+ import [\w, ]+)|(?:import [\w.]+))`", text)
    return list(dict.fromkeys(statements))


def run_clean(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter run from `cwd`: no PYTHONPATH, the repository not on sys.path (the installed
    package is found through its install, as a user's would be)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_readme_shows_imports_of_the_deit_distill_namespace_only():
    statements = readme_imports()
    assert len(statements) >= 6, statements
    ours = [
        s for s in statements if re.match(r"(from|import) (training|model_cards|modeling_deit_distill)\b", s)
    ]
    assert not ours, f"the README imports the repository's folders instead of deit_distill: {ours}"
    assert any("deit_distill.training" in s for s in statements)
    assert any("deit_distill.modeling_deit_distill" in s for s in statements)


def test_every_readme_import_runs_as_written_from_a_folder_outside_the_repository(tmp_path):
    statements = readme_imports()
    code = textwrap.dedent(
        """
        import importlib.util, json, sys
        results = {}
        for statement in STATEMENTS:
            try:
                exec(statement, {})
                results[statement] = "ok"
            except Exception as error:
                results[statement] = f"{type(error).__name__}: {error}"
        # The repository's folders are not importable under their own names from here.
        results["repo folders"] = [n for n in ("training", "model_cards", "modeling_deit_distill") if importlib.util.find_spec(n)]
        print(json.dumps(results))
        """
    ).replace("STATEMENTS", repr(statements))
    done = run_clean(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("repo folders") == []
    assert results == dict.fromkeys(statements, "ok")


def test_the_readme_model_snippet_runs_as_written(tmp_path):
    (snippet,) = [block for block in PYTHON_BLOCKS if "DeiTDistillConfig.from_variant" in block]
    code = snippet + "\nassert out.logits.shape == (2, 10) and out.loss.ndim == 0\nprint('done')\n"
    done = run_clean(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("done"), done.stderr[-3000:]


def test_modules_the_readme_runs_with_python_m_exist(tmp_path):
    modules = sorted(set(re.findall(r"-m (deit_distill\.[\w.]+)", README)))
    assert modules
    code = f"MODULES = {modules!r}\n" + (
        "import importlib.util, json\nprint(json.dumps({m: bool(importlib.util.find_spec(m)) for m in MODULES}))"
    )
    done = run_clean(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == dict.fromkeys(modules, True)


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    """A user's folder with their own `training` and `model_cards` packages next to their script."""
    for package in ("training", "model_cards"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"OWNER = 'user'\nNAME = {package!r}\n")
    (tmp_path / "training" / "losses.py").write_text("USER_LOSSES = True\n")
    return tmp_path


def test_a_users_own_training_package_and_ours_do_not_shadow_each_other(user_project):
    script = user_project / "train_mine.py"
    script.write_text(
        textwrap.dedent(
            """
            import json
            import training, model_cards, training.losses            # the user's own, next to this script
            from deit_distill.training import DistillationLoss, DistillationTrainer
            from deit_distill.training.commands.train import main
            from deit_distill.model_cards import generate_model_card
            import deit_distill.training.losses as our_losses
            import training as again
            print(json.dumps({
                "user_training": [training.OWNER, training.__file__],
                "user_model_cards": [model_cards.OWNER, model_cards.__file__],
                "user_losses": training.losses.USER_LOSSES,
                "user_training_unchanged": again is training and again.OWNER == "user",
                "ours": [our_losses.__file__, DistillationTrainer.__module__, generate_model_card.__module__],
                "our_loss_type": DistillationLoss("hard").distillation_type,
            }))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=user_project, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["user_training"] == ["user", str(user_project / "training" / "__init__.py")]
    assert result["user_model_cards"] == ["user", str(user_project / "model_cards" / "__init__.py")]
    assert result["user_losses"] is True and result["user_training_unchanged"] is True
    assert result["ours"] == [
        str(ROOT / "training" / "losses.py"),
        "deit_distill.training.trainer",
        "deit_distill.model_cards.card",
    ]
    assert result["our_loss_type"] == "hard"
