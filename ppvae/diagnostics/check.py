"""``check_model``: run a model/guide pair once, the way ppvae will, and say in words what works and what to change.

Everything ppvae does to a pair is tried on one batch, at a tiny size, and each outcome becomes a
:class:`~ppvae.diagnostics.findings.Finding`:

- scoring (:func:`ppvae.evaluate`): the log-weights' guards (a pair that observes nothing, scales, factors, guide
  latents the model lacks, latents outside the data plate) raise or warn with the fix; whether particles broadcast
  (else scoring runs one particle at a time, S times the passes), and whether the observed sites are a probability
  of the data (bits/dim, the compare group) or a density;
- training: which parameters get no gradient from the ELBO on this batch (they would never be optimized);
- the generation path ``model(None, batch_size=n)`` that SBC and ``ppvae sample`` use;
- every diagnostic part of :func:`ppvae.diagnose`: which would be skipped (and why) or fail (with its error).

Nothing of the pair changes: scoring runs in eval mode with buffers restored, gradients are taken with
:func:`torch.autograd.grad` (no ``.grad`` is written), and every random draw is made on copies of the RNGs.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro import poutine

from ppvae._local_params import local_module_params
from ppvae._param_store import model_store
from ppvae._rng import fork_rngs
from ppvae.diagnostics.config import DiagnoseConfig, part_configs
from ppvae.diagnostics.diagnosis import diagnose
from ppvae.diagnostics.findings import Finding
from ppvae.errors import PPVAEError
from ppvae.infer.eval_mode import scoring_mode
from ppvae.infer.observed import name_sites
from ppvae.infer.pair import as_pair

__all__ = ["ModelCheck", "check_model"]

#: Every part at the smallest size its settings allow: enough to see whether it runs, not to read its numbers.
_TINY = DiagnoseConfig(
    num_importance_samples=8,
    collapse=dataclasses.replace(DiagnoseConfig().collapse, num_points=8, num_mc_draws=4),
    gaps=dataclasses.replace(DiagnoseConfig().gaps, num_points=2, steps=2, num_particles=2, num_importance_samples=4),
    sbc=dataclasses.replace(DiagnoseConfig().sbc, num_simulations=10, num_draws=4, batch_size=10),
    reference=dataclasses.replace(
        DiagnoseConfig().reference, num_points=1, num_chains=2, num_warmup=2, num_nuts_draws=4, num_guide_draws=4
    ),
)


@dataclass
class ModelCheck:
    """What :func:`check_model` found.

    Attributes:
        findings: errors first (what stops ppvae from using the pair), then warnings and notes.
        diagnostics: part name → None when it runs on this pair, else why it would be skipped or how it failed.
    """

    findings: list[Finding] = field(default_factory=list)
    diagnostics: dict[str, str | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No error: the pair trains and scores."""
        return not any(f.severity == "error" for f in self.findings)

    def __str__(self) -> str:
        order = {"error": 0, "warning": 1, "note": 2, "good": 3}
        lines = [f"{f.severity}: {f.text}" for f in sorted(self.findings, key=lambda f: order[f.severity])]
        for name, why in self.diagnostics.items():
            lines.append(f"diagnose part {name}: " + ("runs" if why is None else why))
        return "\n".join(lines)


def check_model(
    model: Any, guide: Callable | None = None, batch: Any = None, *, data_plate: str = "data"
) -> ModelCheck:
    """Run the pair on ``batch`` as ppvae would and explain every problem and every diagnostic that will not apply.

    Args:
        model, guide: as for :func:`ppvae.fit` (a ``ppvae.VAE``, a module with ``model``/``guide`` methods, or a
            model function with ``guide=``).
        batch: a few datapoints, as the pair takes them: a tensor ``(n, ...)`` or a tuple of its inputs
            ``(x, labels, mask, ...)``; n ≥ 2 (10 to 100 is plenty).
        data_plate: the name of the plate holding local latents and observations.

    Returns:
        :class:`ModelCheck`; ``print(check)`` lists the findings and the diagnostics, ``check.ok`` says whether the
        pair trains and scores.
    """
    pair = as_pair(model, guide, what="check_model")
    args = batch if isinstance(batch, tuple) else (batch,)
    if batch is None or (torch.is_tensor(args[0]) and len(args[0]) < 2):
        raise PPVAEError("check_model needs a batch of at least 2 datapoints, as the pair takes them")
    out = ModelCheck()
    say = out.findings.append
    scored = _check_scoring(model, guide, batch, data_plate, say)
    _check_gradients(pair, args, say)
    _check_generation(pair, say)
    if scored:
        _check_parts(model, guide, batch, data_plate, out)
    return out


def _check_scoring(model: Any, guide: Any, batch: Any, data_plate: str, say: Callable[[Finding], None]) -> bool:
    from ppvae.diagnostics.evaluation import evaluate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ev = evaluate(model, batch, guide=guide, num_samples=4, data_plate=data_plate, seed=0)
        except PPVAEError as err:
            say(Finding("cannot-score", "error", f"ppvae cannot score this pair: {err}"))
            return False
        except Exception as err:  # noqa: BLE001 - a user's pair: its error, in one line
            say(Finding("cannot-score", "error", f"the pair raised when scored: {type(err).__name__}: {err}"))
            return False
    for w in dict.fromkeys(str(w.message) for w in caught):
        say(Finding("scoring-warning", "warning", w))
    if ev.masked:
        say(
            Finding(
                "masked",
                "note",
                f"{name_sites(ev.masked)} masks some observed elements: log p̂ is a probability of the elements it "
                "keeps, not of the whole datapoint, so no bits/dim, and compare ranks the pair only with pairs of "
                "the same kind whose masks on the first scored batch are the same",
            )
        )
    elif ev.discrete:
        say(
            Finding(
                "discrete",
                "note",
                "the observed sites have a discrete support: log p̂ is a probability of the "
                "data, bits/dim are reported and compare ranks it with other models of the same data",
            )
        )
    elif ev.discrete is False:
        say(
            Finding(
                "density",
                "note",
                "the observed sites are densities: no bits/dim, and compare ranks the pair "
                "only with other densities of the same data",
            )
        )
    else:
        say(
            Finding(
                "mixed-observations",
                "note",
                "the observed sites mix discrete and continuous supports: compare puts the pair in a group of its own",
            )
        )
    say(Finding("scores", "good", f"scores: ELBO {float(ev.elbo.mean()):.3f} nats per datapoint on this batch"))
    # evaluate's own broadcast trial on this batch decided how particles were drawn, and says why
    if ev.particles is not None and ev.particles.startswith("sequential ("):
        why = ev.particles[len("sequential (") : -1]
        say(
            Finding(
                "sequential-particles",
                "note",
                f"the pair does not broadcast over a leading particle dim ({why}): "
                "evaluate and diagnose score it one particle at a time, the same estimator in S passes",
            )
        )
    if ev.enumerated is not None:
        summed = ev.summed
        say(
            Finding(
                "enumerated-summed" if summed else "enumerated-sampled",
                "good" if summed else "note",
                f"enumerated sites {ev.enumerated.removeprefix('summed: ')}: scoring sums over their values exactly"
                if summed
                else f"sites marked for enumeration are {ev.enumerated}: scoring draws them (an unbiased estimate, "
                "noisier than the exact sum); make the pair run under poutine.enum to have them summed",
            )
        )
    return True


def _check_gradients(pair: Any, args: tuple, say: Callable[[Finding], None]) -> None:
    """Parameters the ELBO does not reach on this batch, by autograd.grad (no .grad written), in eval mode."""
    from ppvae.infer.params import collect_params

    owner = pair.owner
    try:
        with (
            scoring_mode(owner, pair.model, pair.guide, no_grad=False),
            fork_rngs(0),
            local_module_params() if owner is not None else nullcontext(),
            model_store(pair.model, pair.guide, owner),
            poutine.block(),
        ):
            params = collect_params(pair.model, pair.guide, owner, args)
            loss = pyro.infer.Trace_ELBO().differentiable_loss(pair.model, pair.guide, *args)
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    except PPVAEError as err:
        say(Finding("cannot-train", "error", f"fit would refuse the pair: {err}"))
        return
    except Exception as err:  # noqa: BLE001 - a user's pair
        say(Finding("cannot-train", "error", f"Trace_ELBO raised on the pair: {type(err).__name__}: {err}"))
        return
    unused = [name for (name, _), g in zip(params, grads, strict=True) if g is None]
    if unused:
        say(
            Finding(
                "no-gradient",
                "warning",
                f"{len(unused)} parameter(s) get no gradient from the ELBO on this "
                f"batch: {', '.join(unused[:8])}{' …' if len(unused) > 8 else ''}; if another data stream or loss "
                "trains them that is expected, otherwise freeze them with requires_grad_(False) or use them",
            )
        )
    else:
        say(Finding("trains", "good", f"trains: all {len(params)} parameter tensors get a gradient from the ELBO"))


def _check_generation(pair: Any, say: Callable[[Finding], None]) -> None:
    try:
        with scoring_mode(pair.owner, pair.model, pair.guide), fork_rngs(0), poutine.block():
            with model_store(pair.model, pair.guide, pair.owner):
                pair.model(None, batch_size=2)
    except Exception as err:  # noqa: BLE001 - a user's pair
        first = str(err).splitlines()[0] if str(err) else ""
        say(
            Finding(
                "no-generation-path",
                "note",
                f"model(None, batch_size=n) raised {type(err).__name__}: {first}; "
                "without a generation path ppvae sample cannot draw new data (SBC needs none: it simulates with "
                "the model's observed sites unconditioned): give model x=None and batch_size=1 defaults and sample "
                "the data at the observed site when x is None",
            )
        )
    else:
        say(Finding("generates", "good", "model(None, batch_size=n) generates: ppvae sample can run"))


def _check_parts(model: Any, guide: Any, batch: Any, data_plate: str, out: ModelCheck) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny sizes warn about themselves
        d = diagnose(model, batch, guide=guide, config=_TINY, data_plate=data_plate, seed=0)
    for c in part_configs():
        name = c.part
        if name in d.skipped:
            out.diagnostics[name] = f"skipped: {d.skipped[name]}"
        elif name in d.failed:
            out.diagnostics[name] = f"fails: {d.failed[name]}"
        else:
            out.diagnostics[name] = None
