"""Print the walk of one training step through the package's modules (docs/development.md,
"One training step"): which module runs, in order, while a trainer's ``update`` runs once; with
``--saelens``, the walk of one SAE from ``load_dictionary`` to a SAELens folder ("One SAE, from
``load_dictionary`` to SAELens").

A *stay* is a run of consecutive package code in one module (calls and returns both move the
walk); leaf modules (data types, kernels, checks) are called like a library. A *climb back up*
is a stay in a module between the trainer and the leaves that control reaches from a module
below it and leaves downward again, into a module the walk has already visited: the module
hands data down, takes it back and hands it down to the same place once more, instead of
asking once for what it needs.

    .venv/bin/python scripts/step_walk.py [--saelens]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

import matryoshka_plugin

PACKAGE = Path(matryoshka_plugin.__file__).resolve().parent
# Modules a step only calls into, like a library: they never call back.
LEAVES = ("sparse_latents", "kernels", "errors", "threads", "prefixes", "sparsity")


def _module(filename: str) -> str | None:
    """The module a file belongs to, as the walk names it (``trainers/*`` and ``kernels/*`` are one each)."""
    path = Path(filename).resolve()
    if PACKAGE not in path.parents:
        return None
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] in ("trainers", "kernels") else ".".join(rel.parts)


def _layer(module: str) -> int:
    if module.startswith("trainers"):
        return 0
    if module.split(".")[0] in LEAVES:
        return 3
    return {"sae": 1}.get(module, 2)


def walk(trainer, step: int, x: torch.Tensor) -> list[tuple[str, list[str]]]:
    """The stays of one ``update``: each module whose code runs, in order (consecutive repeats
    collapsed), with the functions control entered there from another module."""
    return trace(lambda: trainer.update(step, x))[0]


def climbs(stays: list[str]) -> int:
    """Climbs back up among ``stays`` (see the module docstring); calls into leaves don't count."""
    inner = [m for m in stays if _layer(m) < 3]
    inner = [m for i, m in enumerate(inner) if i == 0 or inner[i - 1] != m]
    return sum(
        1 for i in range(1, len(inner) - 1)
        if _layer(inner[i]) > 0 and _layer(inner[i - 1]) > _layer(inner[i]) < _layer(inner[i + 1])
        and inner[i + 1] in inner[:i]
    )


def report(name: str, stays: list[tuple[str, list[str]]]) -> str:
    modules = [m for m, _ in stays]
    inner = [m for m in modules if _layer(m) < 3]
    inner = [m for i, m in enumerate(inner) if i == 0 or inner[i - 1] != m]
    lines = [f"{name}: {len(stays)} stays in {len(set(modules))} modules, {climbs(modules)} climbs back up; "
             f"without the leaves: {len(inner)} stays: {' -> '.join(inner)}"]
    for module, functions in stays:
        lines.append(f"  {module}: {', '.join(functions) if functions else '(back)'}")
    return "\n".join(lines)


# The load/export walk's modules, highest first: a call from a module into one listed before it
# climbs back up. Modules not listed (registry, io, hook_names, errors, kernels, ...) are leaves.
SAELENS_ORDER = ("__init__", "saelens", "saelens.export", "saelens.load", "checkpoints", "saelens.convert", "sae")


def _rank(module: str) -> int:
    return SAELENS_ORDER.index(module) if module in SAELENS_ORDER else len(SAELENS_ORDER)


def trace(call: Callable[[], Any]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The stays of ``call()`` (as :func:`walk`) and its calls back up (``"io -> saelens.export:write"``:
    a package function called from a package module ranked below it in :data:`SAELENS_ORDER`)."""
    seen: list[tuple[str, list[str]]] = []
    up: list[str] = []

    def note(module: str | None, function: str | None) -> None:
        if module is None:
            return
        if not seen or seen[-1][0] != module:
            seen.append((module, []))
        if function is not None and function not in seen[-1][1]:
            seen[-1][1].append(function)

    def profile(frame, event, arg):
        if event == "call":
            caller = _module(frame.f_back.f_code.co_filename) if frame.f_back is not None else None
            module = _module(frame.f_code.co_filename)
            note(module, frame.f_code.co_name if caller != module else None)
            if caller is not None and module is not None and _rank(module) < _rank(caller):
                up.append(f"{caller} -> {module}:{frame.f_code.co_name}")
        elif event == "return" and frame.f_back is not None:
            note(_module(frame.f_back.f_code.co_filename), None)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return seen, up


def saelens_walk() -> None:
    """``load_dictionary`` and ``export_to_saelens`` of a 16-latent MatryoshkaBatchTopKSAE folder."""
    import json

    from matryoshka_plugin import MatryoshkaBatchTopKSAE, export_to_saelens, load_dictionary

    torch.manual_seed(0)
    ae = MatryoshkaBatchTopKSAE(8, 16, 2, [4, 12])
    with torch.no_grad():
        ae.threshold.fill_(0.1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "trainer_0"
        folder.mkdir()
        torch.save(ae.state_dict(), folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {
            "dict_class": "MatryoshkaBatchTopKSAE", "package": "matryoshka_plugin", "k": 2, "activation_dim": 8,
            "dict_size": 16, "group_sizes": [4, 12], "layer": 0, "lm_name": "toy",
            "submodule_name": "model.layers.0"}}))
        load_dictionary(folder)
        export_to_saelens(folder, Path(tmp) / "warm")  # first use: imports, SAELens' own set-up
        for name, call in (("load_dictionary", lambda: load_dictionary(folder)),
                           ("export_to_saelens", lambda: export_to_saelens(folder, Path(tmp) / "out"))):
            stays, up = trace(call)
            modules = [m for m, _ in stays]
            print(f"{name}: {len(stays)} stays in {len(set(modules))} modules, {len(up)} calls back up"
                  + (f" ({'; '.join(up)})" if up else "") + f": {' -> '.join(modules)}")


def main() -> None:
    if "--saelens" in sys.argv[1:]:
        saelens_walk()
        return
    from matryoshka_plugin.trainers import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    common = dict(steps=10, activation_dim=16, dict_size=64, device="cpu", seed=0)
    topk = MatryoshkaBatchTopKTrainer(k=4, group_fractions=[0.25, 0.75], dead_feature_threshold=1, **common)
    topk.update(0, x)  # first step: the decoder-bias start and the kernels' self-checks
    print(report("MatryoshkaBatchTopKTrainer.update", walk(topk, 1, x)))
    log = MatryoshkaLogSparsityTrainer(target_l0=4, **common)
    log.update(0, x)
    print(report("MatryoshkaLogSparsityTrainer.update", walk(log, 1, x)))


if __name__ == "__main__":
    main()
