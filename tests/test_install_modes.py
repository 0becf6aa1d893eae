"""``gym.make("WebQA-v0")`` works in a fresh interpreter, outside the source tree and without
``import envs``, after every kind of install: regular (``pip install .``), editable
(``pip install -e .`` in setuptools' default lenient mode, ``editable_mode=strict`` and
``editable_mode=compat``), a built wheel, and a wheel built from the sdist (``python -m build``'s
route). Gymnasium's own ``gym.make("envs:WebQA-v0")`` form works in each too.

Each mode installs a copy of the source tree into its own temporary venv
(``pip install --no-deps --no-build-isolation``). The venv sees the project venv's packages
(torch, gymnasium, setuptools, pip ...) through a folder of links to them, minus this project's
own install, so nothing is downloaded or reinstalled. (``venv --system-site-packages`` would
expose the *base* interpreter's site-packages, not the project venv's, where those packages live.)
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("common", "envs", "corpora", "agents", "distill", "benchmarks", "setup.py", "pyproject.toml",
           "README.md", "webqa_gym_hook.py")
OURS = ("webqa_gym", "__editable__.webqa_gym", "__editable___webqa_gym", "common", "envs", "corpora", "agents",
        "distill", "benchmarks")
MODES = {
    "regular": [["install", "."]],
    "editable": [["install", "-e", "."]],
    "editable-strict": [["install", "-e", ".", "--config-settings", "editable_mode=strict"]],
    "editable-compat": [["install", "-e", ".", "--config-settings", "editable_mode=compat"]],
    "wheel": [["wheel", ".", "-w", "dist"], ["install", "WHEEL"]],
    "sdist-wheel": [["SDIST"], ["wheel", "SDIST_FILE", "-w", "dist"], ["install", "WHEEL"]],
}
MAKE = ("import gymnasium as gym, sys; e = gym.make('WebQA-v0'); obs, info = e.reset(seed=0); "
        "assert 'Question:' in obs, obs[-300:]; import envs; print('ENVS', envs.__file__)")
MAKE_MODULE_FORM = "import gymnasium as gym; e = gym.make('envs:WebQA-ToolCall-v0'); print('OK', e.spec.id)"


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory) -> Path:
    """Links to everything in the project venv's site-packages except this project's install."""
    site = Path(sysconfig.get_paths()["purelib"])
    out = tmp_path_factory.mktemp("shared-site")
    for entry in site.iterdir():
        if entry.name.startswith(OURS) or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (out / entry.name).symlink_to(entry)
    return out


def _venv(path: Path, shared: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "00_shared_site.pth").write_text(str(shared) + "\n")  # a path line: not a site dir
    return py


def _copy_source(dst: Path) -> Path:
    dst.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dst / name)
    return dst


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INDEX"] = "1"  # nothing from the network: --no-deps, --no-build-isolation
    return env


def _install(py: Path, src: Path, steps: list[list[str]]) -> None:
    env = _clean_env()
    for step in steps:
        if step == ["SDIST"]:
            cmd = [str(py), "-c", "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
                   str(src / "sdist")]
        else:
            args = [str(next((src / "dist").glob("*.whl"))) if a == "WHEEL" else
                    str(next((src / "sdist").glob("*.tar.gz"))) if a == "SDIST_FILE" else a for a in step]
            flags = [] if step[0] == "uninstall" else ["--no-deps", "--no-build-isolation"]
            cmd = [str(py), "-m", "pip", *args, *flags, "-q"]
        out = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def _fresh(py: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(py), "-c", code], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", list(MODES))
def test_gym_make_after_install(mode, tmp_path, shared_site):
    py = _venv(tmp_path / "venv", shared_site)
    src = _copy_source(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    before = _fresh(py, "import envs", elsewhere)  # the venv starts without the project
    assert before.returncode != 0 and "No module named 'envs'" in before.stderr, before.stderr[-2000:]

    _install(py, src, MODES[mode])

    out = _fresh(py, MAKE, elsewhere)
    assert out.returncode == 0, f"{mode}: gym.make('WebQA-v0') failed\n{out.stderr[-3000:]}"
    envs_file = Path(out.stdout.split("ENVS ", 1)[1].strip())
    where = src if mode.startswith("editable") else tmp_path / "venv"
    assert where in envs_file.parents, envs_file  # this install's code, not the repository's

    out = _fresh(py, MAKE_MODULE_FORM, elsewhere)
    assert out.returncode == 0 and "OK WebQA-ToolCall-v0" in out.stdout, out.stderr[-3000:]

    pth = next((tmp_path / "venv").glob("lib/python*/site-packages/webqa_gym.pth"))
    _install(py, src, [["uninstall", "-y", "webqa-gym"]])  # the hook is part of the install's record
    assert not pth.exists()
