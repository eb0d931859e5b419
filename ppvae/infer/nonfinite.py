"""What went wrong in a training step whose loss or gradient is NaN or infinite, in words for the error message.

``fit`` calls these only on a faulty step: :func:`describe_fault` says what was non-finite (the loss, which
gradients, or the values a distribution rejected), :func:`blame_sites` traces the guide and the model again on the
offending batch and names the sample sites whose value or log-probability is non-finite, with the batch rows.
A :class:`Fault` holds one faulty step and puts both into one sentence, on demand.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro import poutine

__all__ = ["describe_fault", "blame_sites", "Fault"]


@dataclass(eq=False)
class Fault:
    """A training step whose loss or gradient is NaN/Inf, or whose distributions rejected their values.

    Attributes:
        epoch, batch: where, counted from 1; ``batches``: batches per epoch.
        loss: the step's loss (None when a distribution refused its values: ``invalid``, the ``ValueError``).
        params: the trained parameters, whose gradients are still those of this step.
        model, guide, inputs, device: what :func:`blame_sites` traces again.
    """

    epoch: int
    batch: int
    batches: int
    loss: torch.Tensor | None
    invalid: ValueError | None
    params: list[tuple[str, torch.Tensor]] = field(repr=False)
    model: Callable = field(repr=False)
    guide: Callable = field(repr=False)
    inputs: tuple = field(repr=False)
    device: torch.device = field(repr=False)

    @property
    def where(self) -> str:
        return f"epoch {self.epoch}, batch {self.batch} of {self.batches}"

    @functools.cached_property
    def message(self) -> str:
        """``<what> at <where>; <sites>``. Traces the pair again, so read it before the next step changes the
        parameters and gradients (it is computed once, then kept)."""
        what = describe_fault(self.loss, self.params, self.invalid)
        return f"{what} at {self.where}{blame_sites(self.model, self.guide, self.inputs, self.device)}"


def describe_fault(loss: torch.Tensor | None, params: list[tuple[str, torch.Tensor]], invalid: Any) -> str:
    """The first part of a faulty step's message: the loss, or which gradients, or the values a distribution
    rejected (``invalid``: the ``ValueError`` of Pyro's/torch's argument validation)."""
    if invalid is not None:
        text = " ".join(str(invalid).split())
        site = re.search(r"at site '([^']+)'", text)
        text = re.sub(r"Error while computing log_prob at site '[^']+': ", "", text)
        text = text.split(", but found invalid values")[0]
        return f"a distribution got invalid values{f' at site {site[1]!r}' if site else ''} ({text[:200]})"
    if not torch.isfinite(loss):
        return f"the loss became {loss.item()}"
    bad = [name for name, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"the gradient became NaN or infinite (in {shown}) while the loss was {loss.item():.6g}"


@torch.no_grad()
def blame_sites(model_fn: Callable, guide_fn: Callable, batch: tuple, dev: torch.device) -> str:
    """Trace guide and model again on ``batch`` and name the sample sites whose log-probability is non-finite.

    Runs on a forked RNG, so diagnosing (or skipping) a batch does not change the rest of training.
    """
    found = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), poutine.block():
        try:
            with pyro.validation_enabled(False):
                guide_trace = poutine.trace(guide_fn).get_trace(*batch)
                model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(*batch)
        except Exception as err:  # noqa: BLE001 - a diagnosis only: report it, keep the original error
            return f"; tracing the pair on this batch failed too ({type(err).__name__}: {str(err)[:120]})"
        n = len(batch[0]) if torch.is_tensor(batch[0]) else None
        for role, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "sample":  # a latent's value is the guide's: judged there, its log p(z) here
                    found += _site_faults(name, site, role, n, check_value=name not in guide_trace.nodes)
    if not found:
        return "; every site's log-probability is finite when the batch is traced again (a rare draw or a gradient)"
    return "; " + "; ".join(found[:3])


def _site_faults(name: str, site: dict, role: str, n: int | None, check_value: bool = True) -> list[str]:
    """What is non-finite at one sample site: its value or its log-probability (with the batch rows it holds)."""
    value = site["value"]
    kind = f"{role}, observed" if site["is_observed"] else role
    if check_value and torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
        bad, event_dim = ~torch.isfinite(value), site["fn"].event_dim
        bad = bad.flatten(bad.dim() - event_dim).any(-1) if event_dim else bad  # one flag per datapoint
        return [f"site {name!r} ({kind}) drew non-finite values{_rows(bad, n)}{_arguments(site['fn'])}"]
    try:
        log_prob = site["fn"].log_prob(value)
    except Exception as err:  # noqa: BLE001 - out of support with validation on, for example
        return [f"site {name!r} ({kind}): log_prob fails ({type(err).__name__}: {str(err).splitlines()[0][:100]})"]
    bad = ~torch.isfinite(log_prob)
    if not bad.any():
        return []
    first = log_prob[bad].flatten()[0].item()
    text = f"site {name!r} ({kind}) has log-probability {first}{_rows(bad, n)}"
    if site["is_observed"] and torch.is_tensor(value) and value.dim() and n and value.shape[0] == n:
        rows = bad.reshape(-1, n).any(0) if bad.dim() and bad.shape[-1] == n else None
        if rows is not None and rows.any():
            seen = value[rows].float()
            text += f" whose data run from {seen.min().item():.4g} to {seen.max().item():.4g}"
    return [text + _arguments(site["fn"])]


def _rows(bad: torch.Tensor, n: int | None) -> str:
    """`` at batch rows [i, ...]`` when ``bad``'s last dimension is the batch (a site in the data plate)."""
    if n is None or bad.dim() == 0 or bad.shape[-1] != n:
        return ""
    rows = bad.reshape(-1, n).any(0).nonzero().flatten().tolist()
    return f" at batch rows {rows[:5]}{' ...' if len(rows) > 5 else ''}"


def _arguments(fn: Any) -> str:
    """The range of a distribution's usual arguments (a scale at 0, a loc at 1e38 ...), through wrappers."""
    while hasattr(fn, "base_dist"):  # Independent, MaskedDistribution, ExpandedDistribution ...
        fn = fn.base_dist
    shown = []
    for arg in ("loc", "scale", "logits", "probs", "rate", "concentration", "concentration1", "concentration0"):
        value = fn.__dict__.get(arg)  # set attributes only: a lazy property would compute (and may fail)
        if torch.is_tensor(value) and value.is_floating_point() and value.numel():
            shown.append(f"{arg} from {value.min().item():.3g} to {value.max().item():.3g}")
    return f", under a {type(fn).__name__} with {' and '.join(shown[:2])}" if shown else ""
