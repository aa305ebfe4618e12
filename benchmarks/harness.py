"""What every benchmark study shares: a store of finished runs, mean ± std over seeds, one
markdown-table and one CSV writer, and a command line built from a config dataclass.

A study declares its settings as a dataclass (help text in ``field(metadata={"help": ...})``,
or with :func:`option`), reads them with :func:`parse_config` (flags from the fields, plus
``--config FILE`` (TOML or JSON) and ``--set key=value``), saves each finished run with
:meth:`RunStore.save` and skips it on a rerun with :meth:`RunStore.is_done`, and writes its
tables with :func:`summarise`, :func:`markdown_table` and :func:`write_csv`. Generated results
go under ``docs/results/<study>/`` (:func:`results_dir`); hand-written prose stays in ``docs/``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import io
import json
import math
import statistics
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from matryoshka_plugin.io import atomic_open, atomic_write_json

__all__ = [
    "RESULTS_ROOT", "RunStore", "SettingError", "add_meta_structure", "apply_overrides", "build_parser", "config_from_dict",
    "coerce", "csv_text", "fmt_mean_std", "last_json_line", "load_config_file", "markdown_table", "mean_std", "option",
    "parse_config", "results_dir", "run_worker", "summarise", "width_label", "worker_settings", "write_csv",
]

T = TypeVar("T")
RESULTS_ROOT = Path("docs/results")


def results_dir(study: str) -> Path:
    """Where a study's generated tables, figures and archives go: ``docs/results/<study>``."""
    return RESULTS_ROOT / study


def width_label(width: int) -> str:
    """A dictionary width as the studies name it: ``4096 -> "4k"``, ``512 -> "512"``."""
    return f"{width // 1000}k" if width >= 1000 else str(width)


# ----------------------------------------------------------------------------------------------
# Finished runs
# ----------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings), for comparison."""
    return json.loads(json.dumps(obj, default=str))


class RunStore:
    """One JSON record per finished run, ``<root>/<key>.json`` (a key may hold ``/`` for
    sub-folders), written atomically. A record saved with a fingerprint (the settings that
    determine its result) counts as done only for the same fingerprint, so a changed setting
    reruns that run and an interrupted study resumes where it stopped."""

    def __init__(self, root: str | Path, name: str = "record.json") -> None:
        self.root = Path(root)
        self.name = name

    def path(self, key: str) -> Path:
        """The record file of ``key``: ``root/key/<name>``."""
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"run key {key!r} must be a relative path without '..'")
        return self.root / key / self.name

    def load(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, or None when the run has not finished."""
        path = self.path(key)
        return json.loads(path.read_text()) if path.is_file() else None

    def is_done(self, key: str, fingerprint: Any = None) -> bool:
        """Whether ``key`` has a readable record (with this fingerprint, when one is given)."""
        try:
            record = self.load(key)
        except (OSError, ValueError):  # unreadable: run it again
            return False
        if record is None:
            return False
        return fingerprint is None or record.get("fingerprint") == _canonical(fingerprint)

    def save(self, key: str, record: Mapping[str, Any], fingerprint: Any = None) -> Path:
        """Write ``record`` (plus ``fingerprint`` when given) atomically; returns its path."""
        out = dict(record)
        if fingerprint is not None:
            out["fingerprint"] = _canonical(fingerprint)
        path = self.path(key)
        atomic_write_json(out, path, indent=1, default=str)
        return path

    def records(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The records of ``keys`` that exist (in that order), or of every run under ``root``."""
        if keys is None:
            keys = sorted(str(p.parent.relative_to(self.root)) for p in self.root.rglob(self.name))
        return [r for r in (self.load(k) for k in keys) if r is not None]


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def mean_std(values: Iterable[Any], exact: bool = False) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count of the numbers in
    ``values``; None, NaN and non-numbers are left out; ``(nan, nan, 0)`` when none is left.
    numpy's float sums by default; ``exact=True``: the statistics module's correctly rounded ones
    (the two can differ in the last bit, which a rounded table shows at a tie)."""
    vals = [v for v in map(_number, values) if v is not None]
    if not vals:
        return math.nan, math.nan, 0
    if exact:
        return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def summarise(records: Iterable[Mapping[str, Any]], by: Sequence[str | Callable[[Mapping[str, Any]], Any]],
              metrics: Sequence[str], count: str = "seeds", counts: bool = False) -> list[dict[str, Any]]:
    """One row per group of ``records`` sharing the ``by`` values (keys, or ``(name, function)``
    pairs, in first-seen order): the group's ``by`` values, ``count`` (its number of records),
    and per metric its mean as ``<metric>`` and sample std over the group as ``<metric>_std``
    (plus ``<metric>_n``, the values counted, with ``counts=True``)."""
    getters = []
    for b in by:
        name, get = (b, (lambda r, b=b: r.get(b))) if isinstance(b, str) else b
        getters.append((name, get))
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(get(r) for _, get in getters), []).append(r)
    rows = []
    for values, recs in groups.items():
        row: dict[str, Any] = dict(zip((n for n, _ in getters), values))
        row[count] = len(recs)
        for m in metrics:
            row[m], row[f"{m}_std"], n = mean_std(r.get(m) for r in recs)
            if counts:
                row[f"{m}_n"] = n
        rows.append(row)
    return rows


def fmt_mean_std(mean: Any, std: Any = None, decimals: int = 3, missing: str = "–") -> str:
    """``"0.123 ± 0.004"``; ``missing`` for None/NaN; just the mean when ``std`` is None/NaN."""
    m = _number(mean)
    if m is None:
        return missing
    s = _number(std)
    return f"{m:.{decimals}f}" if s is None else f"{m:.{decimals}f} ± {s:.{decimals}f}"


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (no trailing newline); cells are ``str()``-ed, ``|`` escaped."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    head = list(header)
    return "\n".join([line(head), "|" + "---|" * len(head)] + [line(r) for r in rows])


def csv_text(rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str] | None = None,
             lineterminator: str = "\r\n") -> str:
    """``rows`` as CSV text (the csv module's ``\\r\\n`` line ends unless told); None is written
    as an empty cell, keys outside ``fieldnames`` (default: every key, in first-seen order) are
    dropped."""
    rows = list(rows)
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator=lineterminator)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str] | None = None,
              lineterminator: str = "\r\n") -> Path:
    """Write :func:`csv_text` of ``rows`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_open(path, newline="") as f:
        f.write(csv_text(rows, fieldnames, lineterminator))
    return path


# ----------------------------------------------------------------------------------------------
# SAEBench's meta-structure eval on saved decoders
# ----------------------------------------------------------------------------------------------


def add_meta_structure(runs: Iterable[tuple[str, Callable[[], Any], list[int]]], have: Callable[[str], bool],
                       put: Callable[[str, dict[str, Any]], None], **config: Any) -> None:
    """For every ``(name, load_sae, seeds)`` in ``runs`` that ``have(name)`` says lacks it, run
    SAEBench's meta-structure eval (a BatchTopK meta-SAE on the decoder rows, one per seed;
    ``config`` overrides SAEBench's settings) and hand the result to ``put(name, result)``."""
    from matryoshka_plugin.saebench.meta_structure import decoder_meta_structure

    for name, load_sae, seeds in runs:
        if not have(name):
            put(name, decoder_meta_structure(load_sae(), seeds=list(seeds), **config))


# ----------------------------------------------------------------------------------------------
# Measurements in fresh processes
# ----------------------------------------------------------------------------------------------

WORKER_ENV = "BENCHMARK_WORKER"
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_worker(script: str | Path, settings: Mapping[str, Any], flag: str = "--worker", nproc: int = 1,
               env: Mapping[str, str] | None = None) -> str:
    """Run ``python script <flag>`` in a fresh process (``nproc > 1``: that many under torchrun,
    standalone) from the repository root, with the repository on PYTHONPATH, ``env`` added and
    ``settings`` as JSON in ``$BENCHMARK_WORKER`` (torchrun would read options after the script
    as its own); read them back with :func:`worker_settings`. Returns the worker's stdout;
    RuntimeError with the end of its stderr when it fails."""
    import os
    import subprocess
    import sys

    args = [str(Path(script).resolve()), flag]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
           if nproc > 1 else [sys.executable, *args])
    full_env = dict(os.environ, **(env or {}), **{WORKER_ENV: json.dumps(dict(settings), default=str)})
    full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=REPO_ROOT, check=False)
    if out.returncode:
        raise RuntimeError(f"{Path(script).name} {flag} {dict(settings)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def worker_settings() -> dict[str, Any]:
    """The settings :func:`run_worker` handed this process."""
    import os

    return json.loads(os.environ[WORKER_ENV])


def last_json_line(text: str) -> Any:
    """The last line of ``text`` that is a JSON object (a worker's result after its other output)."""
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


# ----------------------------------------------------------------------------------------------
# Config dataclasses: files, overrides and the command line
# ----------------------------------------------------------------------------------------------


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           flag: bool = True, **argparse_kwargs: Any) -> Any:
    """A dataclass field with its command-line help (``flag=False``: settable only through
    ``--set``/``--config``); ``argparse_kwargs`` (``metavar``, ``choices``...) go to argparse."""
    meta = {"help": help, "flag": flag, "argparse": argparse_kwargs}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _parse_text(text: str) -> Any:
    """A ``--set`` value: a Python/JSON literal where it is one, else the text itself."""
    low = text.strip().lower()
    if low in ("true", "false", "null", "none"):
        return {"true": True, "false": False}.get(low)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return json.loads(text)  # JSON's true/false/null inside a list or table
    except ValueError:
        return text


class SettingError(ValueError):
    """A setting that is unknown, missing or of the wrong type; the message names it."""


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked and converted to the type hint ``tp``; ValueError naming ``name``."""
    tp, optional = _optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise SettingError(f"{name}: None is not allowed (expected {tp})")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, str) and tp is not str and origin is not typing.Literal:
        value = _parse_text(value)
        if value is None and optional:
            return None
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return config_from_dict(tp, value, prefix=f"{name}.")  # its errors name the key already
    try:
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if dataclasses.is_dataclass(value):
                return value
            raise TypeError(f"a table of {tp.__name__} settings")
        if origin is typing.Literal:
            if value not in args:
                raise TypeError(f"one of {list(args)}")
            return value
        if origin in (list, tuple, Sequence) or tp in (list, tuple):
            if not isinstance(value, (list, tuple)):
                value = [value]
            item = args[0] if args else Any
            items = [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple or tp is tuple else items
        if origin is dict or tp is dict:
            if not isinstance(value, Mapping):
                raise TypeError("a table/dict")
            vt = args[1] if len(args) == 2 else Any
            return {k: coerce(v, vt, f"{name}.{k}") for k, v in value.items()}
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError("true or false")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                raise TypeError("an integer")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError("a number")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise TypeError("a string")
            return value
        if tp is Path:
            return Path(value)
        return tp(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, SettingError):
            raise
        raise SettingError(f"{name}: expected {e if isinstance(e, TypeError) else tp}, got {value!r}") from None


def _check_known(keys: Iterable[str], known: Iterable[str], prefix: str) -> None:
    """ValueError naming every key of a table (its part before a dot) that is not a setting."""
    known = set(known)
    bad = sorted({k.partition(".")[0] for k in keys} - known)
    if bad:
        where = f"in [{prefix[:-1]}]" if prefix else "at the top level"
        raise SettingError(f"unknown key(s) {bad} {where}; known: {', '.join(sorted(known))}")


def config_from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """A ``cls`` from ``data``, a parsed TOML/JSON table: ``cls()`` with :func:`apply_overrides`;
    fields without a default must be in ``data`` (a list of tables then reads as a list of such
    dataclasses, e.g. ``[[published]]``)."""
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    if not required:
        return apply_overrides(cls(), data, prefix)
    where = f" in [{prefix[:-1]}]" if prefix else ""
    _check_known(data, (f.name for f in dataclasses.fields(cls) if f.init), prefix)
    missing = [n for n in required if n not in data]
    if missing:
        raise SettingError(f"missing setting(s) {missing}{where}")
    hints = _hints(cls)
    cfg = cls(**{n: coerce(data[n], hints[n], prefix + n) for n in required})
    return apply_overrides(cfg, {k: v for k, v in data.items() if k not in required}, prefix)


def apply_overrides(cfg: T, overrides: Mapping[str, Any], prefix: str = "") -> T:
    """A copy of the dataclass ``cfg`` with ``overrides`` applied: keys may be dotted
    (``"toy.d"``) into nested dataclasses and dict fields; a table merges into a nested
    dataclass or dict field; values are type-checked; an unknown key raises ValueError naming it."""
    hints = _hints(type(cfg))
    _check_known(overrides, (f.name for f in dataclasses.fields(cfg) if f.init), prefix)
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        current = changes.get(head, getattr(cfg, head))
        tp, _ = _optional(hints[head])
        if rest or (isinstance(value, Mapping) and (dataclasses.is_dataclass(current) or isinstance(current, dict))):
            sub = {rest: value} if rest else dict(value)
            if dataclasses.is_dataclass(current):
                changes[head] = apply_overrides(current, sub, f"{prefix}{head}.")
            elif isinstance(current, dict) or current is None and typing.get_origin(tp) is dict:
                vt = typing.get_args(tp)[1] if len(typing.get_args(tp)) == 2 else Any
                merged = copy.deepcopy(current or {})  # dotted keys write into nested tables: not cfg's
                for k, v in sub.items():
                    _set_dotted(merged, k, coerce(v, vt, f"{prefix}{head}.{k}") if "." not in k else v,
                                f"{prefix}{head}.")
                changes[head] = merged
            else:
                raise SettingError(f"setting {prefix}{head!s} is not a table; cannot set {prefix}{key!r}")
        else:
            changes[head] = coerce(value, hints[head], prefix + head)
    return dataclasses.replace(cfg, **changes)


def _set_dotted(d: dict[str, Any], key: str, value: Any, prefix: str = "") -> None:
    head, _, rest = key.partition(".")
    if rest:
        sub = d.setdefault(head, {})
        if not isinstance(sub, dict):
            raise SettingError(f"setting {prefix}{head} is not a table; cannot set {prefix}{key!r}")
        _set_dotted(sub, rest, value, f"{prefix}{head}.")
    else:
        d[head] = value


def _merged(base: Mapping[str, Any], over: Mapping[str, Any], cls: type | None = None) -> dict[str, Any]:
    """``base`` with ``over`` laid on it, table by table at every depth (other values replaced).
    With the dataclass ``cls``, a table merges into a section (a dataclass-typed field) or into a
    table of tables (``dict[str, dict]``, e.g. per-eval overrides), and replaces the base's whole
    for a table of values (e.g. ``seeds = {}`` or ``lrs = {relu = 3e-3}``: one setting)."""
    hints = _hints(cls) if cls is not None else {}
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        merge = isinstance(value, Mapping) and isinstance(old, Mapping)
        if merge and cls is not None and key in hints:
            tp = _optional(hints[key])[0]
            if dataclasses.is_dataclass(tp):
                out[key] = _merged(old, value, tp)
                continue
            args = typing.get_args(tp)
            values = _optional(args[1])[0] if typing.get_origin(tp) is dict and len(args) == 2 else Any
            merge = typing.get_origin(values) is dict or values is dict
        out[key] = _merged(old, value) if merge else value
    return out


def load_config_file(path: str | Path, named: Mapping[str, Path] | None = None,
                     _seen: tuple[Path, ...] = (), cls: type | None = None) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON file as a dict; ValueError naming the file when it is missing
    or broken. A top-level ``extends = "NAME"`` (a key of ``named``, or a file relative to this
    one) starts from that file's values and lays this file's on them, tables merged key by key
    at every depth, other values (lists included) replaced; with the settings' dataclass ``cls``,
    only its sections merge and a dict-valued setting is replaced whole (:func:`_merged`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such config file: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"{path}: extends must name a configuration or a file, got {base!r}")
    base_path = Path((named or {}).get(base) or path.parent / base)
    if base_path.resolve() in (*_seen, path.resolve()):
        raise ValueError(f"{path}: extends {base!r} comes back to itself")
    return _merged(load_config_file(base_path, named, (*_seen, path.resolve()), cls), data, cls)


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls: type, prog: str | None = None, description: str | None = None,
                 parser: argparse.ArgumentParser | None = None, config_file: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of ``cls`` (bool: ``--x/--no-x``; list: one or
    more values, or one token that is a list literal; dict: ``--x KEY=VALUE``, repeated;
    ``X | None``: the X flag; nested dataclasses only through ``--set``), plus ``--set KEY=VALUE`` and, with ``config_file``, ``--config FILE``. Flags not
    given stay absent from the namespace, so :func:`parse_config` can layer them."""
    p = parser or argparse.ArgumentParser(prog=prog, description=description,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not f.init or not meta.get("flag", True):
            continue
        tp, _ = _optional(hints[f.name])
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = meta.get("help", "")
        if default is not None and help_text != argparse.SUPPRESS:
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text = f"{help_text} (default: {shown})".strip()
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is dict or tp is dict:
            kw.update(action=_KeyValues, metavar="KEY=VALUE")
            kw["help"] += "; repeat the flag for more keys"
        else:
            item = args[0] if origin in (list, tuple) and args else tp
            if origin in (list, tuple):
                kw["nargs"] = "+"
            if typing.get_origin(item) is typing.Literal:
                kw["choices"] = list(typing.get_args(item))
            else:
                kw["type"] = (lambda t, n, many: lambda s: _flag_value(s, t, n, many))(item, f.name, "nargs" in kw)
                kw["metavar"] = getattr(item, "__name__", "VALUE").upper()
                if "nargs" in kw:
                    kw["action"] = _Items
        kw.update(meta.get("argparse", {}))
        p.add_argument(_flag_name(f.name), **kw)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_",
                   help="override any setting, dotted for nested ones (--set table.key=value); "
                        "values are Python/JSON literals or plain text; applied last")
    if config_file:
        p.add_argument("--config", dest="config_file", metavar="FILE", default=None,
                       help="a TOML or JSON file of settings (applied before the flags)")
    return p


def _flag_value(text: str, tp: Any, name: str, many: bool = False) -> Any:
    """One flag token as ``tp``; for a list flag, a token that is itself a list gives its items."""
    try:
        if many and tp is not str and isinstance(_parse_text(text), list):
            return coerce(_parse_text(text), list[tp], name)
        return [coerce(text, tp, name)] if many else coerce(text, tp, name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Items(argparse.Action):
    """A list flag's tokens, each already a list of items (:func:`_flag_value`), joined."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [v for items in values for v in items])


class _KeyValues(argparse.Action):
    """A dict flag: each ``--flag KEY=VALUE`` adds one key (values typed later, by the field)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        key, sep, value = str(values).partition("=")
        if not sep or not key:
            parser.error(f"{option_string} expects KEY=VALUE, got {values!r}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), key.strip(): value})


def config_from_args(cls: type[T], args: argparse.Namespace, parser: argparse.ArgumentParser,
                     base: T | None = None) -> T:
    """The config from a namespace of :func:`build_parser`: ``base`` (default ``cls()``), then
    ``--config``, then the flags given, then ``--set``; a bad key or value is a parser error."""
    try:
        cfg = base if base is not None else cls()
        if getattr(args, "config_file", None):
            cfg = apply_overrides(cfg, load_config_file(args.config_file))
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = apply_overrides(cfg, {k: v for k, v in vars(args).items() if k in names})
        sets = {}
        for item in args.set_:
            key, sep, val = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
            sets[key.strip()] = val
        return apply_overrides(cfg, sets)
    except (ValueError, OSError) as e:
        parser.error(str(e))
        raise  # parser.error exits; this line keeps type checkers content


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
                 description: str | None = None, base: T | None = None) -> T:
    """Parse ``argv`` into a ``cls`` (see :func:`build_parser` and :func:`config_from_args`)."""
    parser = build_parser(cls, prog, description)
    return config_from_args(cls, parser.parse_args(argv), parser, base)
