"""Decisions for scripts/setup.sh that need Python (standard library only).

It runs under the interpreter being set up, before anything is installed, so it must not
import anything outside the standard library (packaging is used when pip vendors it).

    python scripts/setup_helper.py check-python [--version X.Y] [--requires SPEC]
    python scripts/setup_helper.py torch-state          # shell assignments, for eval
    python scripts/setup_helper.py removable            # packages a CPU machine can drop
    python scripts/setup_helper.py probe URL TIMEOUT    # exit 0 when URL answers
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import urllib.request
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


def _dependencies(dist) -> list[str]:
    """Names this distribution requires here (markers evaluated, extras left out)."""
    requirement = _requirement_parser()
    names = []
    for line in dist.requires or []:
        if requirement is not None:
            req = requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            names.append(_normalize(req.name))
        else:
            if "extra ==" in line or "extra==" in line:
                continue
            names.append(_normalize(re.match(r"[A-Za-z0-9._-]+", line).group(0)))
    return names


def _installed():
    from importlib import metadata

    return {_normalize(d.metadata["Name"]): d for d in metadata.distributions()
            if d.metadata["Name"]}


def torch_closure(installed) -> set[str]:
    """torch and everything it depends on, transitively: the libraries it links against."""
    seen: set[str] = set()
    todo = ["torch"]
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        todo.extend(_dependencies(installed[name]))
    return seen


def torch_state() -> int:
    """Prints TORCH_* shell assignments describing the torch in this environment."""
    installed = _installed()
    out = {"TORCH_STATUS": "absent", "TORCH_VERSION": "", "TORCH_BUILD": "",
           "TORCH_MISSING": "", "TORCH_ERROR": ""}
    dist = installed.get("torch")
    if dist is not None:
        version = dist.version
        out["TORCH_VERSION"] = version
        deps = _dependencies(dist)
        out["TORCH_MISSING"] = " ".join(d for d in deps if d not in installed)
        # A CUDA build declares nvidia-* libraries (PyPI) or carries a +cuXXX tag.
        cuda = "+cu" in version or any(d.startswith("nvidia-") for d in deps)
        out["TORCH_BUILD"] = "cuda" if cuda else "cpu"
        try:
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
    Nothing in torch's dependency closure is ever listed.
    """
    installed = _installed()
    keep = torch_closure(installed)
    torch = installed.get("torch")
    cpu_torch = torch is not None and not (
        "+cu" in torch.version or any(d.startswith("nvidia-") for d in _dependencies(torch)))
    for name, dist in sorted(installed.items()):
        if name in keep:
            continue
        if name.startswith("nvidia-"):
            print(name)
        elif name == "torchvision" and cpu_torch and "+cpu" not in dist.version:
            print(name)
    return 0


def probe(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # DNS failure, refused, timeout, HTTP error
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


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
    args = parser.parse_args(argv)
    if args.command == "check-python":
        return check_python(args.version, args.requires)
    if args.command == "torch-state":
        return torch_state()
    if args.command == "removable":
        return removable()
    return probe(args.url, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
