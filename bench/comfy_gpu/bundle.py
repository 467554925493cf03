"""What travels to the device: the pinned ComfyUI's tracked files and the wheels the device lacks.

``python -m bench.comfy_gpu prepare`` (here, with network for pip) fills ``.comfy_gpu/`` (ignored,
named in the device call's ``carry``):

- ``comfyui.tar.gz``: ``git archive`` of the pinned commit, minus blobs the mirror lacks (two
  tokenizers SD1.5/SDXL/SD3 never read) and the folders no server start needs (tests).
- ``wheels/``: ``bench/comfy_wheels.txt``, downloaded for CPython 3.12 x86-64.
- ``site/``: three packages carried unpacked and cut down, because their wheels alone would pass
  the 64 MiB that may travel: ``comfy_kitchen`` without its CUDA/HIP extension libraries (230 MB;
  ComfyUI then uses its eager backend, only used for quantized formats), ``bitsandbytes`` with
  only its CUDA 13 libraries (the device's torch is cu130) and a stub ``av`` (PyAV, 36 MB; only
  video nodes use it, and ComfyUI imports it at start-up).

On the device ``install`` unpacks the archive and installs the wheels with ``pip --target``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_COMMIT = "783545f689a0af730065994b46b382ae24844c99"  # ComfyUI v0.33.0
COMFY_MIRROR = Path("/work/.mirror/yzkee+ComfyUI/repo")
BUNDLE = ROOT / ".comfy_gpu"
WHEELS_FILE = ROOT / "bench" / "comfy_wheels.txt"
#: Packages of the wheels file carried unpacked and cut down (see the module docstring).
UNPACKED = ("comfy-kitchen", "bitsandbytes")
#: The bitsandbytes libraries carried: the CPU one and those for torch's CUDA 13.x.
BNB_LIBRARIES = re.compile(r"^libbitsandbytes_(cpu|cuda13\d)\.so$")
#: Folders of ComfyUI that no server start reads.
ARCHIVE_EXCLUDES = ("tests", "tests-unit", ".github", ".ci")
#: Largest the bundle may be (the device call carries the repo too, 64 MiB in all).
BUNDLE_LIMIT = 48 * 2**20
PIP_PLATFORMS = (
    "manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
)  # fmt: skip

AV_STUB = '''"""A stand-in for PyAV written by bench/comfy_gpu (the harness renders no video).

ComfyUI imports ``av`` at start-up for its video types; any attribute is a placeholder class, and
any use of one raises.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0-stub"


class _Meta(type):
    """Class attributes (enum members like ``ColorTrc.ARIB_STD_B67``) are placeholders too."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (_Missing,), {})


class _Missing(metaclass=_Meta):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("PyAV is not installed on this machine (bench/comfy_gpu carries a stub)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Missing,), {})


class _Module(types.ModuleType):
    __path__ = []  # a package: any av.x.y imports

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Missing,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Every ``av.<anything>`` is a stub module."""

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Module(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
'''


def wheel_specs(path: Path = WHEELS_FILE) -> list[str]:
    """The ``name==version`` lines of a wheels file (comments and blanks dropped)."""
    specs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            specs.append(line)
    return specs


def missing_blobs(repo: Path, commit: str) -> list[str]:
    """Paths of ``commit`` whose blobs the (partial) mirror does not hold."""
    tree = subprocess.run(
        ["git", "-C", str(repo), "ls-tree", "-r", commit], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    entries = [line.split(None, 3) for line in tree if line.split(None, 3)[1] == "blob"]
    check = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "--batch-check"],
        input="".join(f"{e[2]}\n" for e in entries),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [e[3] for e, answer in zip(entries, check, strict=True) if answer.endswith(" missing")]


def archive_comfy(out: Path, *, repo: Path = COMFY_MIRROR, commit: str = COMFY_COMMIT) -> Path:
    """``git archive`` of the pinned ComfyUI into ``out`` (tar.gz)."""
    excludes = [f":(exclude){p}" for p in (*missing_blobs(repo, commit), *ARCHIVE_EXCLUDES)]
    with open(out, "wb") as f:
        subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar.gz", commit, "--", ".", *excludes],
            stdout=f,
            check=True,
        )
    return out


def _download(specs: list[str], dest: Path) -> None:
    platforms = [a for p in PIP_PLATFORMS for a in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *specs],
        check=True,
    )  # fmt: skip


def _unpack_kitchen(wheel: Path, site: Path) -> None:
    """comfy_kitchen without its compiled CUDA/HIP libraries (ComfyUI falls back to eager)."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("comfy_kitchen/") and not name.endswith((".so", ".pyd")):
                z.extract(name, site)


def _unpack_bitsandbytes(wheel: Path, site: Path) -> None:
    """bitsandbytes with its CPU and CUDA 13 libraries only (it loads the one torch's CUDA names)."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            library = Path(name).name.startswith("libbitsandbytes_")
            if name.startswith("bitsandbytes/") and (not library or BNB_LIBRARIES.search(Path(name).name)):
                z.extract(name, site)


def prepare(bundle: Path = BUNDLE) -> dict:
    """Fill ``bundle`` for the device; returns the sizes. Idempotent (downloads only what is missing)."""
    bundle.mkdir(exist_ok=True)
    archive_comfy(bundle / "comfyui.tar.gz")
    wheels = bundle / "wheels"
    wheels.mkdir(exist_ok=True)
    specs = [s for s in wheel_specs() if s.split("==")[0] not in UNPACKED]
    _download(specs, wheels)
    site = bundle / "site"
    shutil.rmtree(site, ignore_errors=True)
    (site / "av").mkdir(parents=True)
    (site / "av" / "__init__.py").write_text(AV_STUB, encoding="utf-8")
    tmp = bundle / "unpack-tmp"
    tmp.mkdir(exist_ok=True)
    _download([s for s in wheel_specs() if s.split("==")[0] in UNPACKED], tmp)
    for wheel in tmp.glob("comfy_kitchen-*.whl"):
        _unpack_kitchen(wheel, site)
    for wheel in tmp.glob("bitsandbytes-*.whl"):
        _unpack_bitsandbytes(wheel, site)
    shutil.rmtree(tmp)
    wanted = {s.split("==")[0].lower().replace("-", "_") for s in specs}
    for wheel in wheels.glob("*.whl"):  # drop wheels no longer listed
        if wheel.name.split("-")[0].lower() not in wanted:
            wheel.unlink()
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    if size > BUNDLE_LIMIT:
        raise SystemExit(f".comfy_gpu is {size / 2**20:.1f} MiB, over {BUNDLE_LIMIT / 2**20:.0f} MiB")
    return {"bundle_mib": round(size / 2**20, 1), "wheels": len(list(wheels.glob("*.whl")))}


BNB_PROBE = """
import torch, bitsandbytes as bnb
p = torch.nn.Parameter(torch.ones(8192, device="cuda"))
opt = bnb.optim.AdamW8bit([p], lr=0.1)
p.grad = torch.ones_like(p)
opt.step()
assert opt.state[p]["state1"].dtype == torch.uint8 and float(p.detach()[0]) < 1.0
"""


def check_bitsandbytes(site: Path, python: str) -> str:
    """On the device: whether the carried bitsandbytes takes an 8-bit AdamW step on this GPU. If
    not, it leaves ``site``, so the runs go on without 8-bit optimizer state (as for a user without
    it) instead of failing. Returns the line to print."""
    if not (site / "bitsandbytes").is_dir():
        return "bitsandbytes: not carried"
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([python, "-c", BNB_PROBE], env=env, capture_output=True, text=True, timeout=300)
    if probe.returncode == 0:
        return "bitsandbytes: an 8-bit AdamW step ran on the GPU; memory_mode auto may choose it"
    shutil.rmtree(site / "bitsandbytes")
    last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return f"bitsandbytes: removed, an 8-bit AdamW step failed on the GPU ({last})"


def install(bundle: Path, dest: Path, *, wheels: bool = True) -> tuple[Path, Path]:
    """On the device: unpack ComfyUI into ``dest/ComfyUI`` and the wheels into ``dest/site``.

    ``wheels=False`` (``--smoke`` here, where the ComfyUI venv has them and the Python differs)
    copies only the cut-down packages of ``site/``.

    Returns:
        (the ComfyUI folder, the folder to put on PYTHONPATH).
    """
    comfy = dest / "ComfyUI"
    site = dest / "site"
    if not (comfy / "main.py").is_file():
        comfy.mkdir(parents=True, exist_ok=True)
        with tarfile.open(bundle / "comfyui.tar.gz") as tar:
            tar.extractall(comfy, filter="data")
    if not site.is_dir():
        files = sorted(str(p) for p in (bundle / "wheels").glob("*.whl")) if wheels else []
        if files:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                 "--no-cache-dir", "--target", str(site), *files],
                check=True,
            )  # fmt: skip
        site.mkdir(exist_ok=True)
        shutil.copytree(bundle / "site", site, dirs_exist_ok=True)
    return comfy, site
