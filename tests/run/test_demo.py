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
