"""Options as data: what `simplify` and `prune` accept, validated once, in one place.

The Python API takes these fields as keyword arguments (`simplify(model, align=1)`) or as an
options object; the command line is generated from the same fields (`add_arguments`), so a flag,
its default, its check and its help text are written once. Choices come from the registries they
name (the criteria, granularities and reductions of `pruning.criteria`), so a criterion added
there appears in `--help` and is accepted everywhere at once.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Callable

from . import checks
from .errors import OnnxPruneError
from .parity import DEFAULT_ATOL, DEFAULT_RTOL
from .pruning import criteria


def flag(check, name: str):
    """An argparse type that validates with onnxprune.checks and reports its one-line message."""
    def parse(text: str):
        try:
            return check(text, name)
        except OnnxPruneError as e:  # argparse says "argument --atol: " itself
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{name} ")) from None
    parse.__name__ = name
    return parse


def option(default, flag: str, help: str, *, check: Callable | None = None, choices: Callable | None = None,
           negated: bool = False, repeat: bool = False, metavar: str | None = None):
    """A field with its command-line form. `negated`: a True default switched off by `flag`
    (--no-X); `repeat`: a flag given once per value; `choices`: a callable returning the registry's
    names; `check`: a `checks` rule (value, name) -> value."""
    meta = {"flag": flag, "help": help, "check": check, "choices": choices, "negated": negated, "repeat": repeat,
            "metavar": metavar}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


class Options:
    """Shared behaviour of the option classes below (they are frozen dataclasses)."""

    def __post_init__(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("repeat"):
                value = tuple([value] if isinstance(value, str) else value or ())
            elif meta.get("check") and value is not None:
                value = meta["check"](value, meta["flag"])
            elif meta.get("choices") and value is not None and value not in meta["choices"]():
                raise OnnxPruneError(f"{meta['flag']} must be one of {', '.join(meta['choices']())}, got {value!r}")
            object.__setattr__(self, f.name, value)

    @classmethod
    def of(cls, options=None, **kwargs):
        """`options` (an instance, or None for the defaults) with `kwargs` replacing fields."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown {cls.__name__} field(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        base = options if options is not None else cls()
        return replace(base, **kwargs) if kwargs else base

    @classmethod
    def add_arguments(cls, parser, skip=(), only=None) -> None:
        """Add the fields (all but `skip`, or `only` those) as flags to an argparse parser or group."""
        for f in fields(cls):
            meta = f.metadata
            if f.name in skip or (only is not None and f.name not in only) or not meta:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            kw = {"dest": f.name, "help": meta["help"]}
            if meta["negated"]:
                kw.update(action="store_false", default=default)
            elif isinstance(default, bool):
                kw.update(action="store_true", default=default)
            elif meta["repeat"]:
                kw.update(action="append", default=[])
            else:
                kw["default"] = default
                if meta["check"]:
                    kw["type"] = flag(meta["check"], meta["flag"])
                if meta["choices"]:
                    kw["choices"] = list(meta["choices"]())
            if meta["metavar"] and not isinstance(default, bool):
                kw["metavar"] = meta["metavar"]
            shown = kw.get("default")
            if "%(default)" not in kw["help"] and shown is not None and not isinstance(shown, (bool, list)):
                kw["help"] += " (default %(default)s)"
            parser.add_argument(meta["flag"], **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace, skip=()):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in skip and hasattr(args, f.name)})

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SimplifyOptions(Options):
    fold_bn: bool = option(True, "--no-fold-bn", "skip folding BatchNormalization into Conv/Gemm", negated=True)
    propagate: bool = option(True, "--no-propagate", "skip folding constant channels into the layers that read them",
                             negated=True)
    remove: bool = option(True, "--no-remove", "skip removing dead channels", negated=True)
    pins: tuple = option((), "--pin", "never touch the channels of this tensor (repeatable)", repeat=True,
                         metavar="TENSOR")
    align: int = option(16, "--align", "spare dead channels so that layer widths stay multiples of N, or of the "
                        "largest divisor of N they were multiples of, at most half the width (onnxruntime's "
                        "blocked conv kernels, 16 channels wide on AVX-512 and 8 on AVX2, are much faster then); "
                        "1 removes every dead channel", check=checks.positive_int, metavar="N")
    border_maps: str = option("runtime", "--border-maps", "how the border effect of constant channels read by "
                              "zero-padded convs is added: runtime (a one-channel conv over a ones image made at run "
                              "time; keeps onnxruntime's blocked layout and fusions) or constant (a constant map)",
                              choices=lambda: ("runtime", "constant"))
    check: bool = option(True, "--no-check", "write the result without the parity check", negated=True)
    inputs: object = option(None, "--inputs", "inputs for the parity check: an .npz keyed by input name "
                            "(`onnxprune inspect` lists them; an extra leading axis = several batches) or an .npy for "
                            "a single-input model; default: seeded random inputs", metavar="NPZ")
    atol: float = option(DEFAULT_ATOL, "--atol", "absolute tolerance of the parity check", check=checks.tolerance)
    rtol: float = option(DEFAULT_RTOL, "--rtol", "relative tolerance; an element fails only if it exceeds both",
                         check=checks.tolerance)
    seed: int = option(0, "--seed", "seed of the random inputs", check=checks.seed)


@dataclass(frozen=True)
class PruneOptions(Options):
    criterion: str = option("l1", "--criterion", "importance: filter norms (l1, l2), FPGM (geometric median), random, "
                            "activation-based (apoz, mean_activation: read --calib), or level (unstructured magnitude)", choices=lambda: criteria.CRITERIA)
    sparsity: float | None = option(None, "--sparsity", "fraction of filters (weights, blocks) to zero in every "
                                    "selected layer, in [0, 1)", check=checks.sparsity)
    granularity: str | None = option(None, "--granularity", "default: filter (weight for level)",
                                     choices=lambda: tuple(criteria.FOR_GRANULARITY))
    n: int = option(4, "--n", "block height N of 1xN blocks", check=checks.positive_int)
    rearrange: bool = option(False, "--rearrange", "permute channels first so that 1xN blocks group similar filters")
    balanced: bool = option(False, "--balanced", "1xN: prune the same number of blocks in every block row (its weakest), "
                            "for block-sparse kernels with static loop bounds and an even thread split")
    config: object = option(None, "--config", "NNI-style config list: sparsity, op_types, op_names, exclude",
                            metavar="YAML")
    group_reduce: str = option("sum", "--group-reduce", "how coupled layers' scores combine",
                               choices=lambda: criteria.REDUCE)
    prune_first: bool = option(False, "--prune-first", "also prune the first layer")
    prune_last: bool = option(False, "--prune-last", "also prune the classifier")
    seed: int = option(0, "--seed", "seed of the random criterion (and of --simplify's parity inputs)",
                       check=checks.seed)

    def __post_init__(self):
        super().__post_init__()
        allowed = criteria.FOR_GRANULARITY[self.chosen_granularity]
        if self.criterion not in allowed:
            raise OnnxPruneError(f"criterion {self.criterion!r} does not go with granularity {self.chosen_granularity} "
                                 f"(use {', '.join(allowed)})")

    @property
    def chosen_granularity(self) -> str:
        """`granularity`, or the criterion's own when none was given (level: weight, else filter)."""
        return self.granularity or ("weight" if self.criterion == "level" else "filter")
