"""An installed kpac (a wheel, not only this checkout) carries its shipped weights.

The weights live in the checkout's top-level ``weights/`` folder; pyproject installs them as
the data package ``kpac_cli.weights``. Without that, ``pip install kpac`` would give a tool
whose default model is missing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"


def _setuptools_config() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_and_shipped_file_is_installed():
    cfg = _setuptools_config()
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kpac_cli").rglob("__init__.py")}
    assert set(cfg["packages"]) == on_disk | {"kpac_cli.weights"}  # a new subpackage must be listed
    assert cfg["package-dir"]["kpac_cli.weights"] == "weights"
    patterns = cfg["package-data"]["kpac_cli.weights"]
    shipped = [p.name for p in WEIGHTS.iterdir() if p.is_file()]
    needed = [n for n in shipped if n.endswith(".safetensors")] + ["SHA256SUMS"]
    assert len(needed) >= 4  # three models and their checksums
    for name in needed:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), name
    # the training states (tens of MB) stay in the checkout
    assert not any(fnmatch.fnmatch("last.pt", pat) for pat in patterns)


def test_no_tracked_file_under_weights_is_over_20_mb():
    # the training states keep Adam's moments in a companion file (kpac_cli.train.state)
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z", "weights"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / n for n in listed.decode().split("\0") if n]
    assert files
    big = [(str(p.relative_to(ROOT)), p.stat().st_size) for p in files if p.is_file() and p.stat().st_size > 20_000_000]
    assert not big, big


@pytest.mark.slow
def test_a_wheel_install_finds_the_default_model(tmp_path):
    pytest.importorskip("setuptools")
    # built from a copy, so that the build leaves nothing in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT / "kpac_cli", src / "kpac_cli", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "weights").mkdir()
    for p in WEIGHTS.iterdir():
        if p.is_file():
            shutil.copy(p, src / "weights" / p.name)
    state = src / "weights" / "train-state" / "kpac-3level"  # stands for the real (large) states
    state.mkdir(parents=True)
    (state / "last.pt").write_bytes(b"resumable training state")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("kpac-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for p in sorted(WEIGHTS.glob("*.safetensors")) + [WEIGHTS / "SHA256SUMS"]:
            member = f"kpac_cli/weights/{p.name}"
            assert member in names
            assert hashlib.sha256(zf.read(member)).digest() == hashlib.sha256(p.read_bytes()).digest()
        assert not any("train-state" in n for n in names)
    site = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    # run from elsewhere, with only the installed copy importable as kpac_cli
    code = ("import kpac_cli; from kpac_cli.checkpoints.registry import resolve_model; "
            "print(kpac_cli.__file__); print(resolve_model('kpac-3level')[0]); print(resolve_model('kpac-dual')[0])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("KPAC_WEIGHTS_DIR", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    module, default, dual = (Path(line) for line in run.stdout.split())
    assert module.is_relative_to(site)
    assert default == site / "kpac_cli" / "weights" / "kpac-3level.safetensors"  # checked against SHA256SUMS on the way
    assert dual == site / "kpac_cli" / "weights" / "kpac-dual.safetensors"


def test_every_script_in_examples_and_benchmarks_compiles(tmp_path):
    # the scripts are documented entry points but no test imports all of them; a syntax error
    # would otherwise ship unnoticed
    import py_compile

    scripts = sorted((ROOT / "examples").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(scripts) > 5
    for script in scripts:
        py_compile.compile(str(script), cfile=str(tmp_path / "script.pyc"), doraise=True)


def test_the_inverse_kernel_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "inverse_kernels.py")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "87.4 %" in proc.stdout and "done in" in proc.stdout


def test_the_top_level_names_are_the_sub_packages_own_and_load_on_first_use():
    """`from kpac_cli import Deblurrer, read_image, ...` gives the very objects the sub-packages
    define, while `import kpac_cli` alone stays light (the CLI imports it before anything)."""
    code = (
        "import sys, kpac_cli\n"
        "assert 'torch' not in sys.modules, 'import kpac_cli imported torch'\n"
        "from kpac_cli import Deblurrer, EngineOptions, KPACConfig, build_model, load_checkpoint, read_image, "
        "resolve_model, save_checkpoint, write_image\n"
        "from kpac_cli import engine, images, model, checkpoints\n"
        "from kpac_cli.checkpoints import registry\n"
        "assert (Deblurrer, EngineOptions) == (engine.Deblurrer, engine.EngineOptions)\n"
        "assert (read_image, write_image) == (images.read_image, images.write_image)\n"
        "assert (KPACConfig, build_model) == (model.KPACConfig, model.build_model)\n"
        "assert (load_checkpoint, save_checkpoint, resolve_model) == "
        "(checkpoints.load_checkpoint, checkpoints.save_checkpoint, registry.resolve_model)\n"
        "assert set(kpac_cli.__all__) <= set(dir(kpac_cli))\n"
        "try:\n    kpac_cli.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no AttributeError')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
