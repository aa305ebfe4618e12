"""Decisions for scripts/setup.sh that need Python (standard library only).

It runs under the interpreter being set up, before anything is installed, so it must not
import anything outside the standard library (packaging is used when pip vendors it).

    python scripts/setup_helper.py check-python [--version X.Y] [--requires SPEC]
    python scripts/setup_helper.py torch-state          # shell assignments, for eval
    python scripts/setup_helper.py removable            # packages a CPU machine can drop
    python scripts/setup_helper.py probe URL TIMEOUT    # exit 0 when URL answers
    python scripts/setup_helper.py browser-plan         # shell assignments, for eval
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import shutil
import sys
import urllib.request
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Why a Python outside requires-python cannot work, for the message setup.sh prints.
EXCLUDED_REASONS = {
    (3, 13): "sae-bench 0.6 (the only release line this project supports) requires "
    "numpy>=1.26.4,<2, and numpy 1.x neither supports Python 3.13 nor publishes wheels "
    "for it (numpy 2.1 is the first release for 3.13)",
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def _satisfies(version: tuple[int, ...], spec: str) -> bool:
    """Evaluates a requires-python specifier such as ">=3.10,<3.13" on a release tuple."""
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.fullmatch(r"(>=|<=|==|!=|>|<|~=)\s*([\d.]+)(\.\*)?", clause)
        if m is None:
            raise ValueError(f"unsupported requires-python clause {clause!r}")
        op, bound, wildcard = m.group(1), _release(m.group(2)), m.group(3)
        width = len(bound)
        v = version[:width] if (wildcard or op in ("==", "!=")) else version
        ok = {
            ">=": v >= bound,
            ">": v > bound,
            "<=": v <= bound,
            "<": v < bound,
            "==": v == bound,
            "!=": v != bound,
            "~=": v >= bound and v[: width - 1] == bound[: width - 1],
        }[op]
        if not ok:
            return False
    return True


def requires_python(pyproject: Path = ROOT / "pyproject.toml") -> str:
    m = re.search(r'^requires-python\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
    if m is None:
        raise SystemExit(f"[setup] no requires-python in {pyproject}")
    return m.group(1)


def check_python(version: str | None, spec: str | None) -> int:
    spec = spec or requires_python()
    v = _release(version) if version else tuple(sys.version_info[:3])
    if _satisfies(v, spec):
        return 0
    shown = ".".join(map(str, v[:2]))
    print(f"[setup] error: Python {shown} is not supported: matryoshka_plugin requires "
          f"Python {spec} (pyproject.toml).", file=sys.stderr)
    reason = next((r for minor, r in sorted(EXCLUDED_REASONS.items()) if v[:2] >= minor), None)
    if reason:
        print(f"[setup] why: {reason}.", file=sys.stderr)
    print("[setup] run again with PYTHON=<a supported interpreter>, for example python3.11 or "
          "python3.12.", file=sys.stderr)
    return 1


def _requirement_parser():
    """Returns a Requirement class that evaluates markers, or None without packaging."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return None
    return Requirement


def _requirements(dist, extras: frozenset[str] = frozenset()) -> list[tuple[str, frozenset[str]]]:
    """(name, extras) this distribution requires here, with the given extras of it requested.

    Extras matter: PyPI's torch asks for cuda-toolkit[cublas,cudart,...], and the CUDA
    libraries come only through those extras.
    """
    requirement = _requirement_parser()
    out = []
    for line in dist.requires or []:
        if requirement is not None:
            req = requirement(line)
            if req.marker is not None and not any(
                    req.marker.evaluate({"extra": e}) for e in ("", *sorted(extras))):
                continue
            out.append((_normalize(req.name), frozenset(req.extras)))
        else:  # markers other than extras are not evaluated: keeping too much is safe
            wanted = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", line)
            if wanted and wanted.group(1) not in extras:
                continue
            m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", line)
            req_extras = frozenset(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
            out.append((_normalize(m.group(1)), req_extras))
    return out


def _installed():
    from importlib import metadata

    return {_normalize(d.metadata["Name"]): d for d in metadata.distributions()
            if d.metadata["Name"]}


def torch_closure(installed) -> tuple[set[str], list[str]]:
    """torch and what it depends on, transitively with extras: the libraries it links
    against. Returns (installed names in it, names it requires that are not installed)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    missing: list[str] = []
    todo = [("torch", frozenset())]
    while todo:
        name, extras = todo.pop(0)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name not in installed:
            if name not in missing:
                missing.append(name)
            continue
        names.add(name)
        todo.extend(_requirements(installed[name], extras))
    return names, missing


def _is_cuda_build(version: str, closure: set[str]) -> bool:
    # PyPI's Linux torch declares nvidia-* libraries; other CUDA builds carry a +cuXXX tag.
    return "+cu" in version or any(n.startswith("nvidia-") for n in closure)


def _files(dist) -> set[str]:
    """Files a distribution installed (its RECORD), as paths relative to site-packages,
    leaving out byte-code and the dist-info itself. RECORD is read directly: on Python 3.12
    `Distribution.files` leaves out files that no longer exist, the very case to detect."""
    text = dist.read_text("RECORD") or ""
    paths = (row[0] for row in csv.reader(text.splitlines()) if row)
    return {p for p in paths if not p.endswith(".pyc") and ".dist-info/" not in p}


def damaged(installed, names) -> list[str]:
    """Packages among `names` whose recorded files are missing (pip removed a file that
    two packages share, or files were deleted by hand)."""
    out = []
    for name in sorted(names):
        dist = installed[name]
        if any(not Path(dist.locate_file(f)).exists() for f in _files(dist)):
            out.append(f"{name}=={dist.version}")
    return out


def torch_state() -> int:
    """Prints TORCH_* shell assignments describing the torch in this environment."""
    installed = _installed()
    out = {"TORCH_STATUS": "absent", "TORCH_VERSION": "", "TORCH_BUILD": "",
           "TORCH_MISSING": "", "TORCH_DAMAGED": "", "TORCH_ERROR": ""}
    dist = installed.get("torch")
    if dist is not None:
        version = dist.version
        out["TORCH_VERSION"] = version
        closure, missing = torch_closure(installed)
        out["TORCH_MISSING"] = " ".join(missing)
        out["TORCH_DAMAGED"] = " ".join(damaged(installed, closure - {"torch"}))
        out["TORCH_BUILD"] = "cuda" if _is_cuda_build(version, closure | set(missing)) else "cpu"
        try:
            with warnings.catch_warnings():  # e.g. "Failed to initialize NumPy" before numpy is in
                warnings.simplefilter("ignore")
                import torch  # noqa: F401
        except Exception as exc:  # ImportError, OSError: a missing shared library
            out["TORCH_STATUS"] = "broken"
            out["TORCH_ERROR"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        else:
            out["TORCH_STATUS"] = "ok"
    for key, value in out.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


def removable() -> int:
    """Prints the packages a machine without a GPU does not need, one per line.

    torchvision goes only next to a CPU torch, where the registry's (CUDA) torchvision
    breaks `import transformers`; nvidia-* go only when torch does not depend on them.
    Nothing in torch's dependency closure is listed, nor a package sharing a file with a
    package that stays: pip would delete the shared file (nvidia-nccl-cu12 and -cu13 both
    install nvidia/nccl/lib/libnccl.so.2). Why a candidate stays goes to stderr.
    """
    installed = _installed()
    keep, _ = torch_closure(installed)
    torch = installed.get("torch")
    cpu_torch = torch is not None and not _is_cuda_build(torch.version, keep)
    candidates = []
    for name, dist in sorted(installed.items()):
        if name in keep:
            continue
        if name.startswith("nvidia-") or (
                name == "torchvision" and cpu_torch and "+cpu" not in dist.version):
            candidates.append(name)
    staying = {}
    for name, dist in installed.items():
        if name not in candidates:
            for f in _files(dist):
                staying.setdefault(f, name)
    for name in candidates:
        shared = sorted(f for f in _files(installed[name]) if f in staying)
        if shared:
            print(f"[setup] keeping {name}: it shares {shared[0]} with {staying[shared[0]]}",
                  file=sys.stderr)
        else:
            print(name)
    return 0


def probe(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # DNS failure, refused, timeout, HTTP error
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


BROWSERS = ("chromium", "chromium-browser")


def browser_plan(found: str | None, apt_get: str | None, root: bool, wanted: str = "0") -> tuple[str, str]:
    """``(action, why)`` for the headless browser the tree-view test uses: ``present``, ``apt``
    (install Debian's ``chromium`` with apt-get) or ``skip`` (the test is then skipped).

    Installing a system package is opt-in (``wanted == "1"``, from ``SETUP_BROWSER=1``): by default
    the set-up changes nothing outside the virtual environment."""
    if found:
        return "present", f"{found} is installed"
    if wanted != "1":
        return "skip", ("no chromium, so the tree-view browser test will be skipped; SETUP_BROWSER=1 "
                        "installs it with apt-get (as root)")
    if not apt_get:
        return "skip", ("SETUP_BROWSER=1 but no apt-get to install chromium; install it by hand or the "
                        "tree-view browser test will be skipped")
    if not root:
        return "skip", ("SETUP_BROWSER=1 but apt-get needs root; run `sudo apt-get install -y chromium` "
                        "or the tree-view browser test will be skipped")
    return "apt", "SETUP_BROWSER=1 and no chromium: apt-get install -y chromium (Debian's package)"


def print_browser_plan() -> int:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    action, why = browser_plan(found, shutil.which("apt-get"), root, os.environ.get("SETUP_BROWSER", "0"))
    print(f"BROWSER_ACTION={shlex.quote(action)}")
    print(f"BROWSER_WHY={shlex.quote(why)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-python")
    check.add_argument("--version", help="X.Y to check instead of this interpreter's")
    check.add_argument("--requires", help="specifier instead of pyproject's requires-python")
    sub.add_parser("torch-state")
    sub.add_parser("removable")
    pr = sub.add_parser("probe")
    pr.add_argument("url")
    pr.add_argument("timeout", type=float)
    sub.add_parser("browser-plan")
    args = parser.parse_args(argv)
    if args.command == "check-python":
        return check_python(args.version, args.requires)
    if args.command == "torch-state":
        return torch_state()
    if args.command == "removable":
        return removable()
    if args.command == "browser-plan":
        return print_browser_plan()
    return probe(args.url, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
