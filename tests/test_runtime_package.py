"""runtime/: the gradad-runtime distribution builds a wheel of the light modules only (gradad's
__init__, __main__, cli, io_utils, image_files, html_page, prediction_files, gradad.deploy and
gradad.serve), and its commands run with no torch importable."""
import os
import subprocess
import sys
import zipfile

import pytest

from tests.torchless import torchless_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIGHT_FILES = {"gradad/__init__.py", "gradad/__main__.py", "gradad/cli.py", "gradad/io_utils.py",
               "gradad/image_files.py", "gradad/html_page.py",
               "gradad/prediction_files.py"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel file names, a folder with the wheel installed into it)."""
    tmp = tmp_path_factory.mktemp("runtime")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            os.path.join(ROOT, "runtime"), "-w", str(tmp / "wheel")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "wheel").iterdir()
    names = set(zipfile.ZipFile(wheel).namelist())
    target = tmp / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    return names, target


def test_wheel_holds_only_the_light_modules(installed):
    names, _ = installed
    modules = {n for n in names if n.endswith(".py")}
    deploy = {n for n in modules if n.startswith("gradad/deploy/")}
    serve = {n for n in modules if n.startswith("gradad/serve/")}
    assert modules == LIGHT_FILES | deploy | serve
    assert {"gradad/deploy/scorer.py", "gradad/deploy/metadata.py", "gradad/deploy/predict.py"} <= deploy
    assert {"gradad/serve/app.py", "gradad/serve/store.py", "gradad/serve/server.py"} <= serve
    assert not any(n.startswith("grad_ext/") for n in names)


def test_installed_command_runs_without_torch(installed, tmp_path):
    _, target = installed
    env, marker = torchless_env(tmp_path, [target])
    done = subprocess.run([sys.executable, "-m", "gradad", "predict", "a.png", "--checkpoint", "missing.onnx"],
                          env=env, capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 1 and "missing.onnx" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists(), "predict of an exported file imported torch"
    where = subprocess.run([sys.executable, "-c", "import gradad.cli; print(gradad.cli.__file__)"], env=env,
                           capture_output=True, text=True, cwd=str(tmp_path))
    assert where.stdout.startswith(str(target))
    serve = subprocess.run([sys.executable, "-m", "gradad", "serve", "--checkpoint", "missing.onnx", "--data", "d"],
                           env=env, capture_output=True, text=True, cwd=str(tmp_path))
    assert serve.returncode == 1 and "missing.onnx" in serve.stderr and "Traceback" not in serve.stderr
    assert not marker.exists(), "serve imported torch"
    train = subprocess.run([sys.executable, "-m", "gradad", "train"], env=env, capture_output=True, text=True,
                           cwd=str(tmp_path))
    assert train.returncode == 1 and "needs the full grad-ext" in train.stderr
