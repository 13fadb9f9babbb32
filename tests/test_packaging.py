"""Packaging: one import package `graphtune`; a non-editable install imports and runs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    return next(out.glob("graphtune-*.whl"))


def test_wheel_installs_only_the_graphtune_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"graphtune"}
    for sub in ("agent", "graphs", "search", "envs", "store"):
        assert f"graphtune/{sub}/__init__.py" in names
    assert "graphtune/envs/simulated/profiles/math.yaml" in names
    assert "graphtune/templates/example.yaml" in names


def test_non_editable_install_imports_and_runs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # -S: no site hooks, so the editable finder of the dev install is not active; the
    # dependencies come from this interpreter's site-packages, graphtune from the wheel.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    code = ("import graphtune, graphtune.graphs, graphtune.envs.simulated, graphtune.cli;"
            "import importlib.util as u;"
            "assert graphtune.__file__.startswith(%r), graphtune.__file__;"
            "assert all(u.find_spec(m) is None for m in ('agent','graphs','search','envs','store'));"
            "from graphtune.envs.simulated import load_profile; print(load_profile('math').input_tokens)"
            ) % str(target)
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "202.0" or float(r.stdout) == 202


def test_a_module_runs_from_the_repository_root():
    """`python -m graphtune.<subpackage>...` from the root (as the README says) imports the
    installed package: no folder of the root shadows `graphtune` with only a half of it."""
    assert not (ROOT / "graphtune").exists(), "the app lives under src/; a root graphtune/ would shadow it"
    r = subprocess.run([sys.executable, "-m", "graphtune.envs.simulated.calibrate", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "usage: python -m graphtune.envs.simulated.calibrate" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import graphtune.api, graphtune.envs; print(graphtune.envs.__file__)"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == ROOT / "envs"
