"""launch/results_io.py: the source digest, which names the code behind a result file where the
machine's .git is stale (the device machine's copy of the working tree), and the XLA flags a
result file records."""

import subprocess

import results_io  # from launch/ (tests/conftest.py)


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _commit(repo, files, message):
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    out = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip()


def test_digest_of_the_files_equals_the_digest_of_their_commit(tmp_path):
    _git(tmp_path, "init", "-q")
    first = _commit(
        tmp_path,
        {"taylorcal_jax/a.py": "x = 1\n", "launch/b.py": "y = 2\n", "docs/c.py": "z\n"},
        "first",
    )
    on_disk = results_io.source_digest(str(tmp_path))
    assert on_disk == results_io.source_digest_at(first, str(tmp_path))
    # outside SOURCE or not .py: no effect; inside: a new digest
    (tmp_path / "docs" / "c.py").write_text("changed\n")
    (tmp_path / "launch" / "notes.md").write_text("notes\n")
    assert results_io.source_digest(str(tmp_path)) == on_disk
    second = _commit(tmp_path, {"taylorcal_jax/a.py": "x = 3\n"}, "second")
    assert results_io.source_digest(str(tmp_path)) != on_disk
    assert results_io.source_digest_at(second, str(tmp_path)) == results_io.source_digest(
        str(tmp_path)
    )
    assert results_io.commits_with_digest(on_disk, repo=str(tmp_path)) == [first]


def test_settings_digest_covers_configs_and_shell_wrappers_apart_from_the_source(tmp_path):
    """The configs (budgets, learning rates) and launch/*.sh change what a run does without
    changing the source digest; the settings digest records them, traced the same way."""
    _git(tmp_path, "init", "-q")
    files = {"taylorcal_jax/a.py": "x\n", "configs/c.py": "lr = 1\n", "launch/run.sh": "a\n"}
    first = _commit(tmp_path, files, "first")
    root = str(tmp_path)
    source, settings = results_io.source_digest(root), results_io.settings_digest(root)
    for path in ("configs/c.py", "launch/run.sh"):
        (tmp_path / path).write_text("changed\n")
        assert results_io.source_digest(root) == source
        assert results_io.settings_digest(root) != settings
        _git(tmp_path, "checkout", "-q", "--", path)
    assert results_io.settings_digest(root) == settings
    _commit(tmp_path, {"configs/c.py": "lr = 2\n"}, "second")
    found = results_io.commits_with_digest(settings, repo=root, selection=results_io.SETTINGS)
    assert found == [first]
    assert results_io.invocation()["settings_digest"] == results_io.settings_digest()


def test_progress_log_prefixes_whole_seconds_since_its_start(capsys):
    import time

    results_io.progress_log()("now")
    results_io.progress_log(time.perf_counter() - 65.2)("later")
    assert capsys.readouterr().out == "[     0 s] now\n[    65 s] later\n"


def test_invocation_records_the_processes_xla_flags(monkeypatch):
    # a probe's variants differ only in XLA_FLAGS: each result file must say which it ran under
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_pdl=true")
    assert results_io.invocation()["xla_flags"] == "--xla_gpu_enable_pdl=true"
    monkeypatch.delenv("XLA_FLAGS")
    assert results_io.invocation()["xla_flags"] == ""
