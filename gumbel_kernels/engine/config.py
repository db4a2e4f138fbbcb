"""YAML experiment configs with `_base_` inheritance, every key checked by name, type and range.

A config may name a `_base_` file (relative to itself, or a list of them); its own keys are
merged over the base's recursively. DEFAULTS below fill in everything a config leaves out, so a
config only says what differs. See configs/README.md for the keys.

The known keys are those of DEFAULTS plus the few of KEY_RULES that have no default (the loss
arguments under `method`). A value's type comes from its default (bool, int, float, str, a list
of those); KEY_RULES says it where the default cannot (None defaults, an int or a list, names
from a fixed set) and adds ranges. An unknown key or a bad value is a ConfigError naming the
dotted key, the file (or command-line flag) that set it and, for a typo, the closest known key.
Numbers given as strings (PyYAML reads `1e-3` as a string: YAML 1.1 wants `1.0e-3`) are
converted.
"""
from __future__ import annotations

import abc
import copy
import difflib
import inspect
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from ..data.synthetic import generate as _generate_synthetic
from ..backends import BACKENDS
from ..functional import ACTIVATIONS, GRAD_MODES, MODES
from ..detection.box_loss import BOX_LOSSES
from ..detection.mask_targets import MASK_TARGETS
from ..detection.model import BACKBONES, NORMS
from ..detection.roi_heads import CLS_INITS, SCORE_ACTIVATIONS
from ..detection.transform import MASK_PASTES
from ..losses import LOSS_NAMES

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/default",
    # Model defaults are torchvision's Mask R-CNN; configs/lvis_v1_r50_base.yaml switches the
    # paper rows to the official (mmdetection 2.21) recipe.
    "model": {
        "backbone": "resnet50", "weights": None, "trainable_layers": 3,
        "min_size": [640, 672, 704, 736, 768, 800], "max_size": 1333,
        "normalized_mask": False, "mask_temperature": 20.0, "nms": 0.5, "score_thresh": 1e-4,
        "detections_per_img": 300, "box_batch_size_per_image": 512,
        "box_positive_fraction": 0.25, "norm": None,
        "rpn_pre_nms_top_n": [2000, 1000], "rpn_post_nms_top_n": [2000, 1000],
        "roi_sampling_ratio": 2, "roi_aligned": False, "box_loss": "smooth_l1",
        "mask_target": "roi_align", "mask_paste": "torchvision", "score_activation": None,
        "cls_init": "auto", "cls_init_weight": None, "cls_init_bias": None,
    },
    "data": {
        "root": "data/coco", "train_json": "annotations/lvis_v1_train.json",
        "val_json": "annotations/lvis_v1_val.json", "train_images": ".", "val_images": ".",
        "synthetic": None, "filter_empty": True,
        "sampler": "random", "rfs_threshold": 0.001, "rfs_mode": "deterministic",
        "flip_prob": 0.5, "num_workers": 4, "aspect_ratio_grouping": False,
        "check_images": True,
    },
    "method": {"loss": "softmax", "lambda_": 0.0011, "activation": None},
    "solver": {
        "base_lr": 0.02, "base_batch_size": 16, "batch_size": 2, "schedule": "1x",
        "epochs": None, "max_iters": None, "warmup_iters": 500, "warmup_factor": 0.001,
        "momentum": 0.9, "weight_decay": 1e-4, "amp": False, "checkpoint_every": 1000,
        "snapshots": "steps", "log_every": 20, "tensorboard": "auto",
        "clip_grad_norm": None,
    },
    "eval": {"max_dets": 300, "batch_size": 1, "max_images": None},
}

# Epochs and learning-rate steps (x0.1) of the standard schedules.
SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22))}


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names key and origin."""


class _Invalid(Exception):
    """Raised by a rule with what is wrong about a value; the checker adds key and origin."""


# ----------------------------------------------------------------------------- value rules --

class _Rule(abc.ABC):
    """What a value must be: check() returns it (converted where that is what a user means)
    or raises _Invalid; str() says it in words for the messages."""

    @abc.abstractmethod
    def check(self, value):
        ...

    @abc.abstractmethod
    def __str__(self) -> str:
        ...


class _Number(_Rule):
    """int or float with optional bounds; numeric strings (YAML's '1e-3') are converted."""

    def __init__(self, kind: type, *, min: Optional[float] = None, max: Optional[float] = None,
                 above: Optional[float] = None, below: Optional[float] = None):
        self.kind, self.min, self.max, self.above, self.below = kind, min, max, above, below

    def _parse(self, value):
        if isinstance(value, bool):
            raise _Invalid(f"must be {self}, not a boolean")
        if isinstance(value, str):
            try:
                value = float(value.strip()) if self.kind is float else _int_from_text(value)
            except ValueError:
                raise _Invalid(f"must be {self}") from None
        if not isinstance(value, (int, float)):
            raise _Invalid(f"must be {self}, got {type(value).__name__}")
        if not math.isfinite(value):
            raise _Invalid(f"must be {self} (finite)")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise _Invalid(f"must be {self}")
            return int(value)
        return float(value)

    def check(self, value):
        value = self._parse(value)
        if ((self.min is not None and value < self.min) or (self.max is not None and value > self.max)
                or (self.above is not None and value <= self.above)
                or (self.below is not None and value >= self.below)):
            raise _Invalid(f"must be {self}")
        return value

    def __str__(self) -> str:
        bounds = [f"{op} {limit:g}" for op, limit in ((">=", self.min), (">", self.above),
                                                       ("<=", self.max), ("<", self.below))
                  if limit is not None]
        return " and ".join([("an integer" if self.kind is int else "a number") +
                             (f" {bounds[0]}" if bounds else "")] + bounds[1:])


def _int_from_text(text: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)  # "1e4": checked to be integral by the caller


def Int(**bounds) -> _Rule:
    return _Number(int, **bounds)


def Float(**bounds) -> _Rule:
    return _Number(float, **bounds)


class Text(_Rule):
    def __init__(self, choices: Optional[Sequence[str]] = None):
        self.choices = tuple(choices) if choices is not None else None

    def check(self, value):
        if not isinstance(value, str):
            raise _Invalid(f"must be {self}, got {type(value).__name__}")
        if self.choices is not None and value not in self.choices:
            close = difflib.get_close_matches(value, self.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _Invalid(f"must be {self}{hint}")
        return value

    def __str__(self) -> str:
        if self.choices is None:
            return "a string"
        return "one of " + ", ".join(repr(c) for c in self.choices)


class Flag(_Rule):
    def check(self, value):
        if not isinstance(value, bool):
            raise _Invalid("must be true or false")
        return value

    def __str__(self) -> str:
        return "true or false"


class Maybe(_Rule):
    """`rule` or null."""

    def __init__(self, rule: _Rule):
        self.rule = rule

    def check(self, value):
        if value is None:
            return None
        try:
            return self.rule.check(value)
        except _Invalid as bad:
            text = str(bad)
            if text.startswith("must be "):
                text = "must be null or " + text[len("must be "):]
            raise _Invalid(text) from None

    def __str__(self) -> str:
        return f"null or {self.rule}"


class ListOf(_Rule):
    def __init__(self, item: _Rule, length: Optional[int] = None, min_length: int = 0):
        self.item, self.length, self.min_length = item, length, min_length

    def check(self, value):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _Invalid(f"must be {self}")
        if (self.length is not None and len(value) != self.length) or len(value) < self.min_length:
            raise _Invalid(f"must be {self}, got {len(value)} items")
        out = []
        for k, item in enumerate(value):
            try:
                out.append(self.item.check(item))
            except _Invalid as bad:
                raise _Invalid(f"item {k} ({item!r}) {bad}") from None
        return out

    def __str__(self) -> str:
        size = f"{self.length} " if self.length is not None else \
            (f">= {self.min_length} " if self.min_length else "")
        return f"a list of {size}items, each {self.item}"


class Either(_Rule):
    def __init__(self, *rules: _Rule):
        self.rules = rules

    def check(self, value):
        for rule in self.rules:
            try:
                return rule.check(value)
            except _Invalid:
                continue
        raise _Invalid(f"must be {self}")

    def __str__(self) -> str:
        return " or ".join(str(r) for r in self.rules)


class AnyValue(_Rule):
    """A key whose default (None) says nothing about its type and that no rule describes."""

    def check(self, value):
        return value

    def __str__(self) -> str:
        return "any value"


class Arguments(_Rule):
    """A mapping of keyword arguments of `function` (after its first parameter), each value
    checked by the type of that parameter's default."""

    def __init__(self, function: Callable):
        params = list(inspect.signature(function).parameters.values())[1:]
        self.name = function.__qualname__
        self.rules = {p.name: _rule_from_default(p.default) for p in params
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def check(self, value):
        if not isinstance(value, dict):
            raise _Invalid(f"must be {self}, got {value!r}")
        out = {}
        for key, item in value.items():
            if key not in self.rules:
                close = difflib.get_close_matches(str(key), list(self.rules), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise _Invalid(f"has the unknown key {key!r}{hint}; known: {', '.join(self.rules)}")
            try:
                out[key] = self.rules[key].check(item)
            except _Invalid as bad:
                raise _Invalid(f"key {key!r}={item!r} {bad}") from None
        return out

    def __str__(self) -> str:
        return f"a mapping of arguments of {self.name} ({', '.join(self.rules)})"


def _rule_from_default(default) -> _Rule:
    if isinstance(default, bool):
        return Flag()
    if isinstance(default, int):
        return Int()
    if isinstance(default, float):
        return Float()
    if isinstance(default, str):
        return Text()
    if isinstance(default, (list, tuple)) and default:
        return ListOf(_rule_from_default(default[0]))
    return AnyValue()


_UNIT = dict(min=0.0, max=1.0)

# What DEFAULTS cannot say. A key listed here that DEFAULTS lacks is still a known key, left
# unset unless a config gives it: the `method` keys below are arguments of the losses
# (gumbel_kernels.losses; each loss takes only some of them).
KEY_RULES: Dict[str, _Rule] = {
    "name": Maybe(Text()),
    "description": Maybe(Text()),
    "seed": Int(min=0),
    "model.backbone": Text(BACKBONES),
    "model.weights": Maybe(Text()),
    "model.trainable_layers": Int(min=0, max=5),
    "model.min_size": Either(Int(min=1), ListOf(Int(min=1), min_length=1)),
    "model.max_size": Int(min=1),
    "model.mask_temperature": Float(above=0),
    "model.nms": Float(**_UNIT),
    "model.score_thresh": Float(**_UNIT),
    "model.detections_per_img": Int(min=1),
    "model.box_batch_size_per_image": Int(min=1),
    "model.box_positive_fraction": Float(above=0, max=1),
    "model.norm": Maybe(Text(NORMS)),
    "model.roi_sampling_ratio": Int(min=0),
    "model.box_loss": Text(BOX_LOSSES),
    "model.mask_target": Text(MASK_TARGETS),
    "model.mask_paste": Text(MASK_PASTES),
    "model.score_activation": Maybe(Text(SCORE_ACTIVATIONS)),
    "model.cls_init": Text(CLS_INITS),
    "model.cls_init_weight": Maybe(Float()),
    "model.cls_init_bias": Maybe(Float()),
    "model.rpn_pre_nms_top_n": ListOf(Int(min=1), length=2),
    "model.rpn_post_nms_top_n": ListOf(Int(min=1), length=2),
    "data.synthetic": Maybe(Arguments(_generate_synthetic)),
    "data.sampler": Text(("random", "rfs")),
    "data.rfs_threshold": Float(min=0),
    "data.rfs_mode": Text(("deterministic", "stochastic")),
    "data.flip_prob": Float(**_UNIT),
    "data.num_workers": Int(min=0),
    "method.loss": Text(LOSS_NAMES),
    "method.lambda_": Float(min=0),
    "method.activation": Maybe(Text(ACTIVATIONS)),
    "method.mode": Text(MODES),
    "method.clamp": Maybe(ListOf(Maybe(Float()), length=2)),
    "method.grad_mode": Text(GRAD_MODES),
    "method.backend": Text(("auto",) + BACKENDS),
    "method.reduction": Text(("mean", "sum")),
    "method.ignore_index": Int(),
    "method.num_sampled": Int(min=1),
    "method.freq_weight_power": Float(min=0),
    "method.num_classes": Int(min=1),
    "method.gamma": Float(),
    "method.mu": Float(),
    "method.alpha": Float(),
    "solver.base_lr": Float(above=0),
    "solver.base_batch_size": Int(min=1),
    "solver.batch_size": Int(min=1),
    "solver.schedule": Text(tuple(SCHEDULES)),
    "solver.epochs": Maybe(Int(min=1)),
    "solver.max_iters": Maybe(Int(min=0)),
    "solver.warmup_iters": Int(min=0),
    "solver.warmup_factor": Float(above=0, max=1),
    "solver.momentum": Float(min=0, below=1),
    "solver.weight_decay": Float(min=0),
    "solver.checkpoint_every": Maybe(Int(min=0)),
    "solver.clip_grad_norm": Maybe(Float(above=0)),
    "solver.snapshots": Text(("steps", "epochs", "none")),
    "solver.log_every": Int(min=1),
    "solver.tensorboard": Either(Flag(), Text(("auto",))),
    "eval.max_dets": Int(min=1),
    "eval.batch_size": Int(min=1),
    "eval.max_images": Maybe(Int(min=1)),
}

# Keys a `--resume` may change (a dotted prefix covers its subtree): where the run goes and how
# often it saves, where the data lie and how they are read, and the evaluation. Everything else
# (model, data set, sampler, loss, solver, seed) shapes the run already made and must match.
RESUME_MAY_CHANGE = ("name", "description", "output_dir", "data.root", "data.train_images",
                     "data.val_images", "data.val_json", "data.num_workers", "data.check_images",
                     "solver.max_iters", "solver.checkpoint_every", "solver.snapshots",
                     "solver.log_every", "solver.tensorboard", "eval")


# ---------------------------------------------------------------------------- the schema --

def _flatten(tree: dict, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: value} of every leaf (a non-dict value) of a nested dict."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _schema() -> Tuple[Dict[str, _Rule], set]:
    """(rule of every known leaf key, the set of section keys, "" being the top level)."""
    sections = {""}

    def walk(tree: dict, prefix: str):
        for key, value in tree.items():
            if isinstance(value, dict):
                sections.add(prefix + key)
                walk(value, prefix + key + ".")

    walk(DEFAULTS, "")
    rules = {key: _rule_from_default(value) for key, value in _flatten(DEFAULTS).items()
             if key not in sections}
    rules.update(KEY_RULES)
    return rules, sections


def known_keys() -> List[str]:
    """Every valid dotted leaf key, sorted."""
    return sorted(_schema()[0])


def _closest(key: str, known: Iterable[str]) -> Optional[str]:
    """The known key nearest to a mistyped one: by the whole dotted path, else by the last part
    (a key put in the wrong section)."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {}
    for k in known:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
    return by_leaf[close[0]] if close else None


def _origin(key: str, sources: Dict[str, str]) -> str:
    """Who set `key`: the file or flag recorded for it or for its nearest parent."""
    while True:
        if key in sources:
            return sources[key]
        if "." not in key:
            return "defaults"
        key = key.rsplit(".", 1)[0]


def validate_config(cfg: dict, sources: Optional[Dict[str, str]] = None) -> dict:
    """A checked copy of a full config (numeric strings converted); ConfigError if any key is
    unknown or any value has the wrong type or range. `sources` maps dotted keys to the file or
    flag that set them, for the messages."""
    rules, sections = _schema()
    sources = sources or {}

    def check(node, key: str):
        if key in sections:
            if not isinstance(node, dict):
                children = sorted(k for k in rules if k.startswith(key + "."))
                raise ConfigError(f"{_origin(key, sources)}: {key or 'the top level'} must be a "
                                  f"section (a mapping with keys such as "
                                  f"{', '.join(children[:4])}), got {node!r}")
            out = {}
            for child, value in node.items():
                dotted = f"{key}.{child}" if key else str(child)
                if dotted not in rules and dotted not in sections:
                    close = _closest(dotted, list(rules) + [s for s in sections if s])
                    hint = f" (did you mean {close}?)" if close else ""
                    raise ConfigError(f"{_origin(dotted, sources)}: unknown key {dotted}{hint}")
                out[child] = check(value, dotted)
            return out
        try:
            return rules[key].check(node)
        except _Invalid as bad:
            raise ConfigError(f"{_origin(key, sources)}: {key}={node!r} {bad}") from None

    return check(cfg, "")


# ------------------------------------------------------------------------ reading files --

def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _record_sources(tree: dict, origin: str, sources: Dict[str, str], prefix: str = "") -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        sources[dotted] = origin
        if isinstance(value, dict):
            _record_sources(value, origin, sources, dotted + ".")


def _read(path: str, seen: tuple, sources: Dict[str, str]) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config {path}: `_base_` cycle through {' -> '.join(seen)}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config {path}: `_base_` must be a file name or a list of them")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, _read(os.path.join(os.path.dirname(path), base),
                                      seen + (path,), sources))
    _record_sources(data, path, sources)
    return _merge(merged, data)


def apply_overrides(cfg: dict, overrides: Dict[str, Any], origins: Dict[str, str],
                    sources: Dict[str, str]) -> None:
    """Sets dotted keys ({"solver.max_iters": 10}) in place, recording who set them."""
    for dotted, value in overrides.items():
        origin = origins.get(dotted, "command line")
        node = cfg
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                parent = ".".join(parents[:depth + 1])
                raise ConfigError(f"{origin}: cannot set {dotted}: {parent} is a value "
                                  f"({child!r}), not a section")
            node = child
        node[leaf] = value
        sources[dotted] = origin
        if isinstance(value, dict):
            _record_sources(value, origin, sources, dotted + ".")


def load_config(path: str, overrides: Optional[Dict[str, Any]] = None,
                origins: Optional[Dict[str, str]] = None) -> dict:
    """DEFAULTS <- the `_base_` chain <- the file <- overrides ({"solver.max_iters": 10, ...}),
    checked by validate_config. `origins` names the flag behind each override (default
    "command line")."""
    sources: Dict[str, str] = {}
    cfg = _merge(DEFAULTS, _read(path, (), sources))
    apply_overrides(cfg, overrides or {}, origins or {}, sources)
    return validate_config(cfg, sources)


# ----------------------------------------------------------------------------- resuming --

def resume_conflicts(saved: dict, current: dict) -> List[str]:
    """The keys that differ between a checkpoint's config and the current one and that a resume
    may not change (see RESUME_MAY_CHANGE), as 'key: checkpoint X, now Y'. Keys added to
    DEFAULTS since the checkpoint was written count with their default."""
    old, new = _flatten(_merge(DEFAULTS, saved)), _flatten(current)

    def may_change(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)

    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b and not may_change(key):
            show = lambda v: "(unset)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: checkpoint {show(a)}, now {show(b)}")
    return out
