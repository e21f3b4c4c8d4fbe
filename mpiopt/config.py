"""YAML configuration into frozen dataclasses, validated at construction.

A configuration has four sections. ``problem``, ``data`` and ``algorithm`` each pick an entry
of a :class:`Registry` by ``name``; the other keys of the section are that entry's settings,
declared as dataclass fields with :func:`param`. ``run`` holds the settings of the run itself.
This module is the machinery only: the registries live in the packages they register
(``mpiopt.problems``, ``mpiopt.data``, ``mpiopt.algorithms``) and :mod:`mpiopt.schema`
assembles a whole configuration from them.
Every error is a :class:`~mpiopt.errors.ConfigError` naming the dotted key and the valid
choices or range.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from mpiopt.errors import ConfigError

SECTIONS = ("problem", "data", "algorithm", "run")


def param(default: Any, doc: str, *, low=None, high=None, low_open=False, high_open=False,
          choices=None, required=False):
    """Declare a configuration key with its documentation and its valid range or choices."""
    meta = {"doc": doc, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open, "choices": tuple(choices) if choices else None,
            "required": required}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Registry:
    """Named configuration classes of one section, each imported only when it is asked for.

    The package that owns a section creates its registry with the submodule of every entry;
    each submodule registers its classes with :meth:`register`. :meth:`names` needs no import,
    :meth:`get` imports the one module that defines the entry.

    Args:
        section: the configuration section (``problem``, ``data``, ``algorithm``).
        package: the package the modules live in (e.g. ``mpiopt.algorithms``).
        modules: entry name -> submodule of ``package`` that registers it.
    """

    def __init__(self, section: str, package: str, modules: dict[str, str]):
        self.section = section
        self.package = package
        self._modules = dict(modules)
        self._entries: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: register a config dataclass under ``name``."""
        if name not in self._modules:
            raise RuntimeError(f"{self.section} {name!r} is not listed in the registry of "
                               f"{self.package}")

        def deco(cls):
            cls.NAME = name
            cls.SECTION = self.section
            self._entries[name] = cls
            return cls
        return deco

    def names(self) -> list[str]:
        """Return the registered names, sorted, without importing any entry."""
        return sorted(self._modules)

    def get(self, name: Any) -> type:
        """Return the class registered as ``name`` or raise an error listing the valid names."""
        if not (isinstance(name, str) and name in self._modules):
            raise ConfigError(f"unknown {self.section} {name!r}; valid: "
                              f"{', '.join(self.names())}", key=f"{self.section}.name")
        if name not in self._entries:
            importlib.import_module(f"{self.package}.{self._modules[name]}")
        return self._entries[name]

    def items(self) -> list[tuple[str, type]]:
        """Return (name, class) of every entry, importing them all (for documentation)."""
        return [(name, self.get(name)) for name in self.names()]


def check_ranks(ranks, world_size: int, key: str) -> None:
    """Raise a ConfigError naming ``key`` if a listed rank is not in ``0..world_size-1``."""
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise ConfigError(f"rank {bad[0]} does not exist: ranks are 0..{world_size - 1}",
                          key=key)


@dataclass(frozen=True)
class Section:
    """Base of every configuration section: typed, validated, serialisable."""

    NAME: ClassVar[str] = ""
    SECTION: ClassVar[str] = "run"  # set by Registry.register for registered entries
    SHORTHAND: ClassVar[str | None] = None  # key set by the 'name:value' form, if any

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("required") and value in (None, ""):
                raise ConfigError("is required", key=self._key(f.name))
            _check_range(value, f.metadata, self._key(f.name))
        self.validate()

    def validate(self) -> None:
        """Check relations between keys; raise ConfigError naming the key."""

    def check_world(self, world_size: int) -> None:
        """Check that the settings fit ``world_size`` ranks; raise ConfigError otherwise."""

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}"

    def to_dict(self) -> dict:
        out = {"name": self.NAME} if self.NAME else {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (list(value) if isinstance(value, tuple)
                           else dict(value) if isinstance(value, dict) else value)
        return out


@dataclass(frozen=True)
class RunConfig(Section):
    """Settings of the run itself."""

    steps: int = param(200, "Steps per rank (one local update each).", low=1)
    total_steps: int | None = param(
        None, "Asynchronous algorithms: stop once all ranks together have taken this many "
        "steps, each as many as its speed allows (instead of run.steps per rank; the "
        "learning-rate schedule runs over total_steps / ranks); null: run.steps per rank.",
        low=1)
    eval_every: int = param(50, "Evaluate every this many steps; 0: only the final model.",
                            low=0)
    seed: int = param(0, "Seed of every random choice: init, data order, partition.", low=0)
    out: str | None = param(None, "Run directory; default runs/<algorithm>-<time>.")
    overwrite: bool = param(False, "Replace an existing run directory.")
    quiet: bool = param(False, "No progress lines, only the final summary (batch logs).")
    progress_every_s: float = param(2.0, "Seconds between progress lines on rank 0.", low=0,
                                    low_open=True)
    metrics_chunk: int = param(4096, "Rows of per-step metrics buffered before a flush.",
                               low=16)
    comm_timeout_s: float = param(300.0, "Deadline of any single wait on communication.",
                                  low=0, low_open=True)
    target_accuracy: float | None = param(
        None, "Report the time and step at which test accuracy first reaches this.",
        low=0, high=1)
    device: str = param("cpu", "Where arrays live: cpu (numpy), gpu (CuPy), auto.",
                        choices=("cpu", "gpu", "auto"))
    cuda_aware: bool | str = param(
        "auto", "Whether MPI takes device buffers: auto (probed once per job, before "
        "training), true, or false (staged through host memory).", choices=("auto", True, False))
    time_limit_s: float | None = param(None, "Stop after this wall time (seconds).", low=0,
                                          low_open=True)
    slowdown: dict[int, float] = param(
        {}, "Ranks made slower on purpose (heterogeneous workers): rank -> factor; each of "
        "their steps' computation takes that many times as long (the rank sleeps, it does not "
        "spin), e.g. --set 'run.slowdown={1: 20}'.", low=1)

    def check_world(self, world_size: int) -> None:
        check_ranks(self.slowdown, world_size, "run.slowdown")

    def expected_steps(self, world_size: int) -> int:
        """Return the steps a rank expects to take: ``steps``, or its share of ``total_steps``.

        The learning-rate schedule and the progress lines span this many steps.
        """
        if self.total_steps is None:
            return self.steps
        return -(-self.total_steps // max(world_size, 1))


@dataclass(frozen=True)
class Config:
    """A complete, validated run configuration."""

    problem: Section
    data: Section
    algorithm: Section
    run: RunConfig
    warnings: tuple = ()

    def to_dict(self) -> dict:
        return {s: getattr(self, s).to_dict() for s in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- values


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in inner)
        return text + " or null" if len(inner) < len(args) else text
    if origin is tuple:
        return f"list of {_describe(args[0])}"
    if origin is dict:
        return f"mapping of {_describe(args[0])} to {_describe(args[1])}"
    if tp is Any:
        return "any"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp, key: str) -> Any:
    """Convert a parsed YAML value to the declared type ``tp`` or raise a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"expected {_describe(tp)}, got {value!r}", key=key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}", key=key)
        return {coerce(k, args[0], key): coerce(v, args[1], key) for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}", key=key)
        return tuple(coerce(v, args[0], key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"expected {_describe(tp)}, got {value!r}", key=key)


def _check_range(value: Any, meta: dict, key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{value!r} is not one of: {', '.join(map(_yaml_text, choices))}",
                          key=key)
    if isinstance(value, dict):
        values = tuple(value.values())
    else:
        values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"must be finite, got {v}", key=key)
        low, high = meta.get("low"), meta.get("high")
        bad_low = low is not None and (v <= low if meta.get("low_open") else v < low)
        bad_high = high is not None and (v >= high if meta.get("high_open") else v > high)
        if bad_low or bad_high:
            raise ConfigError(f"must be in {_range_text(meta)}, got {v}", key=key)


def _yaml_text(value: Any) -> str:
    """Return ``value`` as it is written in YAML (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _range_text(meta: dict) -> str:
    low, high = meta.get("low"), meta.get("high")
    lo = "(" if meta.get("low_open") or low is None else "["
    hi = ")" if meta.get("high_open") or high is None else "]"
    return f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"


# --------------------------------------------------------------------------- building


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def build_section(cls: type, raw: dict, section: str, prune: bool = False,
                  warnings: list | None = None) -> Section:
    """Build ``cls`` from the raw mapping of one section, coercing and checking every key."""
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in known:
            if prune:
                if warnings is not None:
                    warnings.append(f"{section}.{key} does not apply to {section} "
                                    f"{cls.NAME!r} and is ignored")
                continue
            what = f"{section} {cls.NAME!r}" if cls.NAME else section
            raise ConfigError(f"unknown key for {what}; valid keys: "
                              f"{', '.join(sorted(known)) or '(none)'}",
                              key=f"{section}.{key}")
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value`` into the key path and the YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"expected dotted.key=value, got {text!r}", key="--set")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or path[0] not in SECTIONS or not path[1]:
        raise ConfigError(f"{key!r} is not section.key with section one of: "
                          f"{', '.join(SECTIONS)}", key="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def read_yaml(path: str) -> dict:
    """Read a YAML mapping from ``path``; every failure is a one-line ConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping with sections "
                          f"{', '.join(SECTIONS)}")
    return data


def replace_run(cfg: Config, **changes) -> Config:
    """Return ``cfg`` with keys of the run section changed (validated again)."""
    run = build_section(RunConfig, {**cfg.run.to_dict(), **changes}, "run")
    return dataclasses.replace(cfg, run=run)


# --------------------------------------------------------------------------- docs


def owner_of(cls: type, name: str) -> type:
    """Return the class whose definition of ``name`` is in effect (the most derived)."""
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return klass
    return cls


def field_rows(cls: type, names: list[str]) -> list[str]:
    """Return the markdown table rows documenting the keys ``names`` of ``cls``."""
    hints = _hints(cls)
    rows = ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = by_name[name]
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if meta.get("choices"):
            valid = ", ".join(map(_yaml_text, meta["choices"]))
        elif meta.get("low") is not None or meta.get("high") is not None:
            valid = _range_text(meta)
        else:
            valid = ""
        shown = "(required)" if meta.get("required") else yaml.safe_dump(
            list(default) if isinstance(default, tuple) else default,
            default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{name}` | {_describe(hints[name])} | `{shown}` | {valid} | "
                    f"{meta.get('doc', '')} |")
    return rows
