"""git_state: the commit and whether the code differs from it (changed results do not count)."""
import subprocess

import pytest

from dropinf.pipeline import common


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "results" / "reference").mkdir(parents=True)
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "reference" / "table.md").write_text("| a |\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    monkeypatch.setattr(common, "_GIT_CACHE", {})
    return tmp_path


def _head(repo):
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_clean_checkout(repo):
    assert common.git_state(str(repo)) == (_head(repo), "false")


def test_changed_reference_results_are_not_dirty_code(repo):
    (repo / "results" / "reference" / "table.md").write_text("| b |\n")
    assert common.git_state(str(repo)) == (_head(repo), "false")


def test_changed_code_is_dirty(repo):
    (repo / "results" / "reference" / "table.md").write_text("| b |\n")
    (repo / "src" / "code.py").write_text("x = 2\n")
    assert common.git_state(str(repo)) == (_head(repo), "true")


def test_outside_a_checkout_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_GIT_CACHE", {})
    assert common.git_state(str(tmp_path)) == ("unknown", "")


def test_no_environment_variable_overrides_git(repo, monkeypatch):
    # a stray variable must not falsify the record: git of the tree is the only source
    (repo / "src" / "code.py").write_text("x = 2\n")
    monkeypatch.setenv("DROPINF_COMMIT", "def456")
    monkeypatch.setenv("DROPINF_GIT_DIRTY", "false")
    assert common.git_state(str(repo)) == (_head(repo), "true")
