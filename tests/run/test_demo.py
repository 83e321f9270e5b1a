"""The README's main job (`python -m qkd_jax.demo`) finds its config and workdir in the repository."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_demo_defaults_point_into_the_repository():
    from qkd_jax.run import demo

    assert demo.DEFAULT_CONFIG == ROOT / "configs" / "digits_demo.py" and demo.DEFAULT_CONFIG.is_file()
    assert demo.DEFAULT_WORKDIR == ROOT / "workdirs" / "digits_demo"


def test_demo_command_line_parses_its_default_config():
    """`python -m qkd_jax.demo --helpfull` parses the flags, which reads the default config file
    (a wrong path prints "No such file"); absl exits 1 after printing the help."""
    out = subprocess.run([sys.executable, "-m", "qkd_jax.demo", "--helpfull"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    text = out.stdout + out.stderr
    assert "No such file" not in text and "Traceback" not in text, text[-2000:]
    assert "fresh:" in text and str(ROOT / "workdirs" / "digits_demo") in text


def test_demo_names_its_default_config_unless_one_is_given():
    from qkd_jax.run import demo

    assert demo.with_default_config(["demo", "--config.quant.w_bits=3"]) == [
        "demo", f"--config={demo.DEFAULT_CONFIG}", "--config.quant.w_bits=3"]
    for given in (["demo", "--config=x.py", "--fresh"], ["demo", "--config", "x.py"]):
        assert demo.with_default_config(given) == given


def _fake_run(workdir: pathlib.Path) -> pathlib.Path:
    """What a finished one-phase run leaves: config.json, metrics.jsonl, a phase directory."""
    (workdir / "teacher" / "3").mkdir(parents=True)
    (workdir / "teacher" / "3" / "x").write_text("data")
    (workdir / "config.json").write_text('{"phase_order": "teacher"}')
    (workdir / "metrics.jsonl").write_text("")
    return workdir


def test_clear_workdir_deletes_all_but_the_lock_and_only_a_run(tmp_path):
    import pytest

    from qkd_jax.run.fresh import NotAWorkdirError, check_fresh, clear_workdir

    workdir = _fake_run(tmp_path / "w")
    (workdir / ".lock").write_text("ours")
    (workdir / "notes.txt").write_text("mine")
    with pytest.raises(NotAWorkdirError, match=r"besides a qkd_jax run it holds \['notes.txt'\]"):
        clear_workdir(workdir, keep=".lock")
    assert (workdir / "teacher" / "3" / "x").exists()
    (workdir / "notes.txt").unlink()
    with pytest.raises(NotAWorkdirError, match="it holds .*/w/teacher, which this run reads"):
        check_fresh(workdir, protected=[workdir / "teacher"])
    assert clear_workdir(workdir, keep=".lock") == ["config.json", "metrics.jsonl", "teacher"]
    assert [p.name for p in workdir.iterdir()] == [".lock"] and (workdir / ".lock").read_text() == "ours"
    assert clear_workdir(workdir, keep=".lock") == []  # only the lock: nothing to check or delete
    assert clear_workdir(tmp_path / "missing", keep=".lock") == []
    (tmp_path / "file").write_text("")
    with pytest.raises(NotAWorkdirError, match="it is a file"):
        clear_workdir(tmp_path / "file", keep=".lock")


def test_clear_workdir_through_a_symbolic_link_keeps_the_link(tmp_path):
    from qkd_jax.run.fresh import clear_workdir

    target = _fake_run(tmp_path / "target")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (target / "teacher" / "link").symlink_to(outside)  # a link inside: removed, its target kept
    link = tmp_path / "link"
    link.symlink_to(target)
    assert clear_workdir(link, keep=".lock") == ["config.json", "metrics.jsonl", "teacher"]
    assert link.is_symlink() and target.is_dir() and list(target.iterdir()) == []
    assert (outside / "keep.txt").read_text() == "keep"


def test_unavailable_backend_is_one_line(monkeypatch):
    import jax
    import pytest

    from qkd_jax.run import cli_errors

    def devices():
        raise RuntimeError("Unable to initialize backend 'cuda': no CUDA devices\n(more detail)")

    monkeypatch.setattr(jax, "devices", devices)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    with pytest.raises(cli_errors.BackendUnavailableError) as err:
        cli_errors.check_backend()
    assert str(err.value).startswith("JAX_PLATFORMS='cuda': JAX cannot start that backend on this machine "
                                     "(Unable to initialize backend 'cuda': no CUDA devices); unset JAX_PLATFORMS")
    assert "\n" not in str(err.value)
