"""Name → class registries for interchangeable building blocks (priors, likelihoods, guides, networks).

A registered class records the keyword arguments it was built with in ``module.spec`` so that a model can be
saved as JSON configuration plus weights and rebuilt without unpickling (see :mod:`ppvae.io`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ppvae.errors import ConfigError

__all__ = ["Registry", "spec_of"]

T = TypeVar("T", bound=type)


def spec_of(module: nn.Module) -> dict[str, Any] | None:
    """The ``{"name": ..., "kwargs": {...}}`` a registered block was built with, or None for other modules."""
    return getattr(module, "spec", None)


class Registry:
    """A registry of one kind of building block (``"prior"``, ``"likelihood"``, ``"guide"``, ``"network"``).

    ``build(spec, **context)`` accepts a registered name or an already built ``nn.Module``. The context holds
    what the caller knows (``latent_dim``, ``data_shape``, ``in_features`` ...); only the keys a class's
    ``__init__`` accepts are passed to it, so classes declare just what they need.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def get(self, name: str) -> type:
        key = name.lower().replace("_", "-")
        if key not in self._classes:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._classes[key]

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register under ``name`` and record init kwargs in ``self.spec``."""

        def deco(cls: T) -> T:
            init = cls.__init__
            sig = inspect.signature(init)

            @functools.wraps(init)
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                bound = sig.bind(self, *args, **kwargs)
                init(self, *args, **kwargs)
                # Only the class actually instantiated records (a registered parent's init runs inside it).
                if type(self) is cls:
                    bound.apply_defaults()
                    recorded = dict(list(bound.arguments.items())[1:])
                    recorded.update(recorded.pop("kwargs", {}) if _has_var_kw(sig) else {})
                    self.spec = {"name": name, "kwargs": _jsonable(recorded)}

            cls.__init__ = __init__  # type: ignore[method-assign]
            cls.block_name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return deco

    def build(self, spec: str | dict | nn.Module, **context: Any) -> nn.Module:
        """Build a block from a name, a ``{"name":, "kwargs":}`` spec, or return a module unchanged.

        Keyword arguments in ``context`` are passed only if the class's ``__init__`` names them; those in a
        spec's ``"kwargs"`` always are (and override the context).
        """
        if isinstance(spec, nn.Module):
            return spec
        if isinstance(spec, str):
            name, kwargs = spec, {}
        elif isinstance(spec, dict) and "name" in spec:
            name, kwargs = spec["name"], dict(spec.get("kwargs", {}))
        else:
            raise ConfigError(f"a {self.kind} must be a name ({', '.join(self.names())}) or an nn.Module, got {spec!r}")
        cls = self.get(name)
        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        args = {k: v for k, v in context.items() if k in params or takes_any}
        args.update(kwargs)
        unknown = [k for k in kwargs if k not in params and not takes_any]
        if unknown:
            valid = [k for k in params if k != "self"]
            raise ConfigError(f"{self.kind} {name!r} has no option(s) {unknown}; its options are {valid}")
        try:
            return cls(**args)
        except TypeError as err:
            raise ConfigError(f"cannot build {self.kind} {name!r} with {args}: {err}") from None


def _has_var_kw(sig: inspect.Signature) -> bool:
    return any(p.kind is p.VAR_KEYWORD and p.name == "kwargs" for p in sig.parameters.values())


def _jsonable(value: Any) -> Any:
    """Convert tuples to lists and check the value is JSON-serializable (configs are saved as JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    # A non-JSON argument (a user's nn.Module, say) stays as it is: json.dumps in ppvae.save then refuses it.
    return value
