"""examples/quickstart.ipynb: committed without outputs, and runs top to bottom in this venv's kernel.

The kernel is launched from a throw-away kernelspec whose argv is this interpreter
(`sys.executable -m ipykernel_launcher`), so no kernel is registered anywhere and the notebook
cannot run in some other Python. The kernel does not go through tests/conftest.py; its
environment drops the 8-virtual-device flag so it sees one CPU device, as a user's kernel would.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import sys

import pytest

# The test extras install these: a missing one is a broken install, so it fails (no skip).
import ipykernel  # noqa: F401
import matplotlib  # noqa: F401
import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
KERNEL = "qkd-jax-test-venv"
ACCURACY_RE = re.compile(r"SQAKD W2A2 student top-1 \(no labels\): ([0-9]+(?:\.[0-9]+)?)%")
TEACHER_RE = re.compile(r"FP32 teacher top-1: ([0-9]+(?:\.[0-9]+)?)%")
CUSTOM_RE = re.compile(r"custom 'triangle' estimator, 1 epoch: ([0-9]+(?:\.[0-9]+)?)%")


def _read() -> "nbformat.NotebookNode":
    return nbformat.read(NOTEBOOK, as_version=4)


def _kernel_manager(tmp_path: pathlib.Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qkd_jax test venv",
        "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def _kernel_env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp_path)  # the notebook's tempfile.mkdtemp() workdir is cleaned with tmp_path
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".cache" / "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env.pop("MPLBACKEND", None)  # the kernel's inline backend
    return env


def _execute(nb, tmp_path: pathlib.Path, cwd: pathlib.Path, timeout: int):
    """Runs `nb` (in place) with a trailing cell reporting the kernel's interpreter; returns it."""
    nb.cells.append(nbformat.v4.new_code_cell(
        "import sys\nprint('KERNEL_PREFIX=' + sys.prefix)\nprint('KERNEL_EXECUTABLE=' + sys.executable)"))
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=timeout,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute(env=_kernel_env(tmp_path))
    probe = _text(nb.cells.pop())
    assert f"KERNEL_PREFIX={sys.prefix}" in probe, probe
    assert f"KERNEL_EXECUTABLE={sys.executable}" in probe, probe
    return nb


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    return "".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"code cell {i} has outputs: strip them before committing"
        assert cell.execution_count is None, f"code cell {i} has execution_count {cell.execution_count}"
    assert "widgets" not in nb.metadata


def test_setup_cell_finds_the_repository_from_the_repo_root(tmp_path):
    """The first code cell locates configs/ from the repo root as cwd (the full run uses examples/)."""
    nb = _read()
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells = nb.cells[: first + 1]
    _execute(nb, tmp_path, ROOT, timeout=180)
    assert f"repository: {ROOT}" in _text(nb.cells[first])


@pytest.mark.slow
def test_notebook_runs_and_the_student_learns(tmp_path):
    nb = _execute(copy.deepcopy(_read()), tmp_path, NOTEBOOK.parent, timeout=900)
    outputs = [_text(c) for c in nb.cells if c.cell_type == "code"]
    assert all("Traceback" not in o for o in outputs)
    assert "backward pass matches" in "".join(outputs)
    # section 4: a custom estimator defined in a cell, registered, checked against its closed form
    # and used to train the student through the library API
    assert "custom estimator registered; its backward matches" in "".join(outputs)
    custom = CUSTOM_RE.search("".join(outputs))
    assert custom and 0.0 <= float(custom.group(1)) <= 100.0, "".join(outputs)[-3000:]
    final = outputs[-1]
    match, teacher = ACCURACY_RE.search(final), TEACHER_RE.search(final)
    assert match and teacher, f"no accuracy line in the last cell's output:\n{final}"
    student_top1, teacher_top1 = float(match.group(1)), float(teacher.group(1))
    # 10 classes (chance 10 %); three epochs give a teacher well above chance and a W2A2 student
    # that learned from it without labels.
    assert 50.0 <= teacher_top1 <= 100.0, final
    assert 25.0 <= student_top1 <= 100.0, final
