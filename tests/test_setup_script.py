"""scripts/setup.sh chooses a torch build and a clean-up that leave a working environment.

The script runs in plan mode (SETUP_PLAN_ONLY=1) on a small virtual environment whose
packages are bare metadata (dist-info) and stub modules, with pip pointed at a local folder
instead of any index, so nothing is downloaded or installed.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pip
import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"
HELPER = ROOT / "scripts" / "setup_helper.py"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="setup.sh is a bash script")


class FakeVenv:
    """A venv without pip's own install: pip is linked in, packages are dist-info only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
        self.python = root / "bin" / "python"
        self.site = Path(subprocess.check_output(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True).strip())
        (self.site / "pip").symlink_to(Path(pip.__file__).resolve().parent)

    def add(self, name: str, version: str, requires: tuple[str, ...] = (),
            module: str | None = None, files: dict[str, bool] | None = None) -> None:
        """files: path relative to site-packages -> whether it exists on disk."""
        info = self.site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(lines) + "\n")
        record = [f"{info.name}/METADATA,,"]
        for path, exists in (files or {}).items():
            record.append(f"{path},,")
            if exists:
                (self.site / path).parent.mkdir(parents=True, exist_ok=True)
                (self.site / path).write_bytes(b"")
        (info / "RECORD").write_text("\n".join(record) + "\n")
        if module is not None:
            pkg = self.site / name
            pkg.mkdir()
            (pkg / "__init__.py").write_text(module)


# What PyPI's Linux torch 2.13 declares: CUDA libraries directly, one of which needs another,
# and more of them only through extras of cuda-toolkit.
CUDA_TORCH_REQUIRES = (
    "filelock",
    'cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"',
    'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
    'opt-einsum>=3.3; extra == "opt-einsum"',
)
CUDA_TOOLKIT_REQUIRES = (
    "nvidia-cublas==13.1.1.3.*; extra == 'cublas'",
    "nvidia-cuda-runtime==13.0.96.*; extra == 'cudart'",
    "nvidia-npp==13.0.1.2.*; extra == 'all'",
)
CUDNN_REQUIRES = ("nvidia-cublas",)
LIBNCCL = "nvidia/nccl/lib/libnccl.so.2"
LIBCUDNN_ERROR = ('raise ImportError("libcudnn.so.9: cannot open shared object file: '
                  'No such file or directory")\n')


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plan(venv: FakeVenv | Path, wheels: Path, cpu_index: str | None = None,
             gpu: str = "0") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "TORCH_", "SETUP_", "USE_LOCK"))}
    env.update(
        SETUP_PLAN_ONLY="1", VENV=str(getattr(venv, "root", venv)), PYTHON=sys.executable,
        SETUP_GPU=gpu, SETUP_PROBE_TIMEOUT="3",
        SETUP_CPU_INDEX_URL=cpu_index or f"http://127.0.0.1:{_closed_port()}/whl/cpu",
        # pip sees only this folder: no index, no configuration file.
        PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True,
                          timeout=120)


def plan_lines(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {}
    for line in result.stdout.splitlines():
        if line.startswith("[setup] ") and ": " in line:
            key, _, rest = line[len("[setup] "):].partition(": ")
            lines[key] = rest
    return lines


def listed_after(lines: dict[str, str], key: str, label: str) -> list[str]:
    match = re.search(label + r": (.*?)(?:;|\. |$)", lines[key])
    return match.group(1).split() if match else []


def would_remove(lines: dict[str, str]) -> set[str]:
    return set(lines["plan"].removeprefix("would remove now:").split()) - {"nothing"}


@pytest.fixture
def venv(tmp_path: Path) -> FakeVenv:
    return FakeVenv(tmp_path / "venv")


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    return folder


def test_without_a_cpu_build_the_cuda_build_keeps_its_libraries(venv, wheels):
    """The failure on Python 3.10/3.12: CUDA torch installed, then its nvidia-* removed."""
    lines = plan_lines(run_plan(venv, wheels))
    assert "source: cuda-fallback" in lines["torch"], lines
    assert "torch==2.13.0 " in lines["torch"] and "+cpu" not in lines["torch"]

    # After that install: torch with the libraries it links against, xgboost's nccl and
    # the registry's torchvision (built for this CUDA torch, so it works here).
    venv.add("filelock", "3.0")
    venv.add("torch", "2.13.0", CUDA_TORCH_REQUIRES, module='__version__ = "2.13.0"\n')
    venv.add("cuda-toolkit", "13.0.3", CUDA_TOOLKIT_REQUIRES)
    venv.add("nvidia-cudnn-cu13", "9.20.0.48", CUDNN_REQUIRES)
    venv.add("nvidia-cublas", "13.1.1.3")
    venv.add("nvidia-cuda-runtime", "13.0.96")
    venv.add("nvidia-npp", "13.0.1.2")  # only cuda-toolkit[all] asks for it
    venv.add("nvidia-nccl-cu12", "2.27.3")  # xgboost's, not torch's
    venv.add("torchvision", "0.28.0", ("torch==2.13.0",))
    lines = plan_lines(run_plan(venv, wheels))
    assert lines["torch"].startswith("keep"), lines
    assert would_remove(lines) == {"nvidia-npp", "nvidia-nccl-cu12"}


def test_the_plan_for_a_new_environment_creates_nothing(tmp_path, wheels):
    target = tmp_path / "new-venv"
    lines = plan_lines(run_plan(target, wheels))
    assert lines["torch"].startswith("install torch==2.13.0 (source: cuda-fallback)"), lines
    assert not target.exists()
    # The browser step is planned too: without SETUP_BROWSER=1 it never installs anything.
    found = any(shutil.which(b) for b in ("chromium", "chromium-browser"))
    assert lines["browser"].startswith("present" if found else "skip"), lines
    if not found:
        assert "SETUP_BROWSER=1" in lines["browser"], lines


def test_a_local_cpu_build_is_preferred_and_its_clean_up_drops_cuda_packages(venv, wheels):
    # pip lists versions from file names; a CPU wheel for any Python.
    (wheels / "torch-2.13.0+cpu-py3-none-any.whl").write_bytes(b"")
    (wheels / "torch-2.15.0-py3-none-any.whl").write_bytes(b"")
    lines = plan_lines(run_plan(venv, wheels))
    assert "source: cpu-local" in lines["torch"], lines
    assert "torch==2.13.0+cpu" in lines["torch"]

    venv.add("torch", "2.13.0+cpu", ("filelock",), module='__version__ = "2.13.0+cpu"\n')
    venv.add("filelock", "3.0")
    venv.add("torchvision", "0.28.0", ("torch==2.13.0",))
    venv.add("nvidia-nccl-cu12", "2.27.3")
    assert would_remove(plan_lines(run_plan(venv, wheels))) == {"torchvision", "nvidia-nccl-cu12"}


def test_a_cpu_torchvision_stays_next_to_a_cpu_torch(venv, wheels):
    venv.add("torch", "2.13.0+cpu", (), module='__version__ = "2.13.0+cpu"\n')
    venv.add("torchvision", "0.28.0+cpu", ("torch==2.13.0",))
    assert would_remove(plan_lines(run_plan(venv, wheels))) == set()


def test_the_pytorch_cpu_index_is_used_when_it_answers(venv, wheels, tmp_path):
    served = tmp_path / "served"
    (served / "whl" / "cpu" / "torch").mkdir(parents=True)
    (served / "whl" / "cpu" / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
        lines = plan_lines(run_plan(venv, wheels, cpu_index=url))
    finally:
        server.shutdown()
    assert "source: cpu-index" in lines["torch"], lines
    assert f"--index-url {url} torch==2.13.0" in lines["torch"]


def test_a_torch_missing_its_libraries_is_repaired_not_kept(venv, wheels):
    """Re-running on a venv whose nvidia-* wheels were removed restores them."""
    venv.add("filelock", "3.0")
    venv.add("torch", "2.13.0", CUDA_TORCH_REQUIRES, module=LIBCUDNN_ERROR)
    lines = plan_lines(run_plan(venv, wheels))
    assert lines["torch"].startswith("repair"), lines
    assert "libcudnn.so.9" in lines["torch"]
    assert listed_after(lines, "torch", "lacks dependencies") == ["cuda-toolkit",
                                                                  "nvidia-cudnn-cu13"]

    # The toolkit is there but not the libraries its requested extras bring.
    venv.add("cuda-toolkit", "13.0.3", CUDA_TOOLKIT_REQUIRES)
    venv.add("nvidia-cudnn-cu13", "9.20.0.48", CUDNN_REQUIRES)
    lines = plan_lines(run_plan(venv, wheels))
    assert lines["torch"].startswith("repair"), lines
    assert listed_after(lines, "torch", "lacks dependencies") == ["nvidia-cublas",
                                                                  "nvidia-cuda-runtime"]


def test_a_package_sharing_a_library_file_with_torchs_is_kept(venv, wheels):
    """nvidia-nccl-cu12 (xgboost's) and nvidia-nccl-cu13 (torch's) install the same
    libnccl.so.2: uninstalling the first deletes the file the second provides."""
    venv.add("torch", "2.13.0", ("nvidia-nccl-cu13",), module='__version__ = "2.13.0"\n')
    venv.add("nvidia-nccl-cu13", "2.29.7", files={LIBNCCL: True})
    venv.add("nvidia-nccl-cu12", "2.27.3", files={LIBNCCL: True})
    venv.add("nvidia-npp", "13.0.1.2", files={"nvidia/npp/lib/libnppc.so.13": True})
    result = run_plan(venv, wheels)
    assert would_remove(plan_lines(result)) == {"nvidia-npp"}
    assert f"keeping nvidia-nccl-cu12: it shares {LIBNCCL} with nvidia-nccl-cu13" in result.stderr


def test_a_dependency_whose_library_file_was_deleted_is_reinstalled(venv, wheels):
    """What removing nvidia-nccl-cu12 did to a Python 3.10 set-up: libnccl.so.2 gone while
    pip still lists nvidia-nccl-cu13 as installed."""
    venv.add("torch", "2.13.0", ("nvidia-nccl-cu13",),
             module='raise ImportError("libnccl.so.2: cannot open shared object file")\n')
    venv.add("nvidia-nccl-cu13", "2.29.7", files={LIBNCCL: False})
    lines = plan_lines(run_plan(venv, wheels))
    assert lines["torch"].startswith("repair"), lines
    assert "libnccl.so.2" in lines["torch"]
    assert listed_after(lines, "torch", "files are missing from") == ["nvidia-nccl-cu13==2.29.7"]


def test_a_gpu_machine_gets_the_default_build_and_no_clean_up(venv, wheels):
    (wheels / "torch-2.13.0+cpu-py3-none-any.whl").write_bytes(b"")
    lines = plan_lines(run_plan(venv, wheels, gpu="1"))
    assert "(source: cuda)" in lines["torch"] and "+cpu" not in lines["torch"], lines
    assert lines["clean-up"].startswith("none")


@pytest.mark.parametrize("version,supported", [("3.9", False), ("3.10", True), ("3.11", True),
                                               ("3.12", True), ("3.13", False),
                                               ("3.14", False)])
def test_requires_python_admits_only_pythons_the_set_up_works_on(version, supported):
    result = subprocess.run([sys.executable, str(HELPER), "check-python", "--version", version],
                            capture_output=True, text=True)
    assert (result.returncode == 0) == supported, result.stderr
    if tuple(map(int, version.split("."))) >= (3, 13):
        assert "numpy" in result.stderr and "sae-bench" in result.stderr


def _helper_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("setup_helper", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("found,apt,root,wanted,action", [
    ("/usr/bin/chromium", "/usr/bin/apt-get", True, "1", "present"),
    ("/usr/bin/chromium", "/usr/bin/apt-get", True, "0", "present"),
    (None, "/usr/bin/apt-get", True, "1", "apt"),
    (None, "/usr/bin/apt-get", True, "0", "skip"),
    (None, "/usr/bin/apt-get", True, "", "skip"),
    (None, "/usr/bin/apt-get", True, "yes", "skip"),
    (None, None, True, "1", "skip"),
    (None, "/usr/bin/apt-get", False, "1", "skip"),
])
def test_browser_plan(found, apt, root, wanted, action):
    got, why = _helper_module().browser_plan(found, apt, root, wanted)
    assert got == action
    if action == "skip":
        assert "test will be skipped" in why
        assert "SETUP_BROWSER=1" in why


def test_browser_install_is_opt_in(tmp_path):
    """With apt-get on PATH, no chromium and root, the helper plans an install only when
    SETUP_BROWSER=1 is set; the default leaves the system alone and says how to opt in."""
    if not hasattr(os, "geteuid"):
        pytest.skip("no geteuid on this platform")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text("#!/bin/sh\ntouch \"$0.ran\"\n")
    apt.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETUP_")}
    env["PATH"] = str(bin_dir)  # no chromium here, whatever this machine has

    def plan(**extra: str) -> dict[str, str]:
        out = subprocess.run([sys.executable, str(HELPER), "browser-plan"], env={**env, **extra},
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines())

    default = plan()
    assert default["BROWSER_ACTION"] == "skip"
    assert "SETUP_BROWSER=1" in default["BROWSER_WHY"] and "skipped" in default["BROWSER_WHY"]
    assert plan(SETUP_BROWSER="0")["BROWSER_ACTION"] == "skip"
    assert plan(SETUP_BROWSER="1")["BROWSER_ACTION"] == ("apt" if os.geteuid() == 0 else "skip")
    assert not (bin_dir / "apt-get.ran").exists()  # planning never runs apt-get


