"""The comparison table and its verdict: only comparable numbers side by side, with paired standard errors.

Rows are cells; ranks, ``elpd_diff ± dse`` and per-datapoint differences are computed within a comparability group
on the test rows where every cell of the group has a finite log p̂ (ArviZ ``compare`` on the pointwise IWAE
log p̂; Vehtari, Gelman & Gabry 2017). Guides are ranked within one prior × likelihood by inference gap and k̂.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from ppvae._stats import paired_difference
from ppvae.blocks.specs import short_spec
from ppvae.diagnostics import arviz_io

__all__ = ["COLUMNS", "build_table", "verdict"]

# Every column of Comparison.table(), documented (the report prints this glossary).
COLUMNS: dict[str, str] = {
    "cell": "prior · likelihood · guide (· objective · seed when they vary)",
    "prior": "the cell's prior (empty for an already-fitted model)",
    "likelihood": "the cell's likelihood",
    "guide": "the cell's guide",
    "objective": "the training objective (elbo, meanfield, iwae, enum)",
    "seed": "the cell's seed (initial weights and training)",
    "group": "comparability group: cells are ranked only within one",
    "status": "ok, or failed (see error)",
    "rank": "rank by log p̂ within the group (1 = best)",
    "elbo": "ELBO per test datapoint (nats), from the guide, on the scored (discretized where needed) likelihood",
    "log_px": "log p̂(x) per test datapoint (nats), IWAE with S importance samples",
    "log_px_se": "standard error of log_px over test datapoints",
    "bits_per_dim": "−log₂ p̂(x) / D from log_px (probability masses only)",
    "elpd_diff": "Σ_i (log p̂ of the group's best cell − log p̂ of this cell), nats, ≥ 0 (ArviZ compare's sign)",
    "dse": "standard error of elpd_diff, paired over the same test rows",
    "delta_per_point": "mean over datapoints of log p̂ of this cell − log p̂ of the group's best cell (nats, ≤ 0)",
    "delta_se": "paired standard error of delta_per_point",
    "num_compared": "test rows behind rank and differences: those where every ranked cell of the group is finite",
    "khat_median": "median PSIS k̂ over test datapoints (< 0.5 good)",
    "khat_p90": "90th percentile of PSIS k̂",
    "khat_share": "share of datapoints with k̂ above min(1 − 1/log10 S, 0.7): log p̂ unreliable there",
    "ess_per_sample": "median importance-sampling ESS / S",
    "inference_gap": "log p̂ − ELBO (nats) ≈ KL(q ‖ posterior)",
    "amortization_gap": "L[q*] − L[q] on the gap datapoints (nats): what the encoder loses",
    "approximation_gap": "log p̂ − L[q*] (nats): what the guide family cannot express",
    "guide_rank": "rank of the guide within its prior × likelihood (× objective × seed) by inference gap, then k̂: how "
    "close each guide is to the posterior of the decoder it trained with (each cell trains its own decoder)",
    "active_units": "latent dimensions with Var_x E_q[z_d] > 0.01",
    "latent_dim": "latent dimensions D",
    "mutual_information": "I(x; z) estimate (nats), at most log M",
    "collapsed_dims": "latent dimensions with KL_d < 0.01 nats",
    "sbc_p": "simulation-based calibration p-value (≤ 0.01: miscalibrated)",
    "ref_mean_err_sd": "|E_q z − E_NUTS z| in NUTS posterior sd, mean over dims and reference points",
    "ref_sd_ratio": "sd_q / sd_NUTS, mean over dims and reference points (1: matched)",
    "seconds": "wall time of the cell (training and scoring, s)",
    "estimator": "what made log_px: IWAE_S",
    "split": "the data the scores are on",
    "scored_as": "how a continuous likelihood was turned into level probabilities (cdf bins or dequantized)",
    "warnings": "findings of the cell's diagnosis that limit trust in its numbers",
    "error": "why a failed cell failed",
}


_PARTS = ("prior", "likelihood", "guide", "objective", "seed")
_MAX_NAN_SHARE = 0.1  # a cell with more NaN test rows is not ranked
def build_table(cells: list[dict[str, Any]], settings: Any) -> Any:
    """One row per cell with the columns of :data:`COLUMNS`; ranks and paired differences within each group."""
    import pandas as pd

    rows = [_row(c, settings) for c in cells]
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cells):
        if c["status"] == "ok" and "arrays" in c:
            groups.setdefault(c["group"], []).append(i)
    for members in groups.values():
        _rank_group([cells[i] for i in members], [rows[i] for i in members], settings.num_samples)
    _rank_guides(cells, rows)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.sort_values(["group", "rank", "cell"], na_position="last", kind="stable").reset_index(drop=True)


def _row(c: dict[str, Any], settings: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS, math.nan)
    row.update(cell=c["label"], group=c.get("group", "—"), status=c["status"], error=c.get("error"))
    row.update(estimator=f"IWAE_{settings.num_samples}", split="test", seconds=c.get("seconds", math.nan))
    row.update(scored_as=c.get("scored_as") or "as trained", warnings="", guide_rank=math.nan, rank=math.nan)
    spec = c.get("cell", {})
    row.update({k: short_spec(spec[k]) if k in spec and k != "seed" else spec.get(k, "") for k in _PARTS})
    if c["status"] != "ok":
        return row
    d = c["diagnosis"]
    ev, psis = d["evaluation"], d["psis"]
    row.update({k: _num(ev.get(k)) for k in ("elbo", "log_px", "log_px_se", "bits_per_dim", "inference_gap")})
    row.update(khat_median=_num(psis["khat_median"]), khat_p90=_num(psis["khat_p90"]))
    row.update(khat_share=_num(psis["share_above_threshold"]), ess_per_sample=_num(psis["ess_per_sample_median"]))
    if d.get("collapse"):
        col = d["collapse"]
        row.update(active_units=col["active_units"], latent_dim=col["latent_dim"])
        row.update(mutual_information=_num(col["mutual_information"]))
        row["collapsed_dims"] = len(col["collapsed_dims"]) if col["collapsed_dims"] is not None else math.nan
    if d.get("gaps"):
        row.update(amortization_gap=_num(d["gaps"]["amortization"]), approximation_gap=_num(d["gaps"]["approximation"]))
    if d.get("sbc"):
        row["sbc_p"] = _num(d["sbc"]["p_value"])
    if d.get("reference"):
        ref = d["reference"]["points"]
        row["ref_mean_err_sd"] = float(np.mean([r["mean_error_sd"] for r in ref]))
        row["ref_sd_ratio"] = float(np.mean([r["sd_ratio"] for r in ref]))
    found = [f["text"] for f in d.get("findings", []) if f["severity"] == "warning"]
    found += [f"{part} failed: {error}" for part, error in d.get("failed", {}).items()]
    row["warnings"] = "; ".join(found + c.get("warnings", []))
    return row


def _num(value: Any) -> float:
    """JSON numbers back to floats ("inf"/"-inf" strings and null included)."""
    if value is None:
        return math.nan
    return float(value)


def _rank_group(cells: list[dict], rows: list[dict], num_samples: int) -> None:
    """Rank a group's cells by log p̂ with paired differences, on the test rows finite for every ranked cell.

    A cell with log p̂ = −inf on some row gives that test datapoint zero probability: it ranks last. A cell with
    more than 10% NaN rows is not ranked (its rows would shrink everyone's comparison); both get a warning.
    """
    lp = [np.asarray(c["arrays"]["log_px"], dtype=np.float64) for c in cells]
    zero = [bool(np.any(v == -np.inf)) for v in lp]
    nan_share = [float(np.mean(np.isnan(v))) for v in lp]
    ranked = [i for i in range(len(lp)) if not zero[i] and nan_share[i] <= _MAX_NAN_SHARE]
    for i in range(len(lp)):
        if zero[i]:
            _warn(rows[i], f"log p̂ = −inf on {int(np.sum(lp[i] == -np.inf))} test rows (zero probability): ranked last")
        elif nan_share[i] > _MAX_NAN_SHARE:
            _warn(rows[i], f"not ranked: log p̂ is NaN on {100 * nan_share[i]:.0f}% of test rows")
    if ranked:
        finite = np.logical_and.reduce([np.isfinite(lp[i]) for i in ranked])
        if len(ranked) == 1 or finite.sum() < 2:
            best = ranked[0] if len(ranked) == 1 else max(ranked, key=lambda i: np.nanmean(lp[i]))
            rows[best].update(rank=1, elpd_diff=0.0, dse=0.0, delta_per_point=0.0, delta_se=0.0)
            rows[best]["num_compared"] = int(finite.sum())
            if len(ranked) > 1:
                _warn(rows[best], "the group's cells share fewer than 2 finite test rows: not compared")
            ranked = [best]
        else:
            table = arviz_io.compare({str(i): lp[i][finite] for i in ranked}, num_samples=num_samples)
            order = [int(k) for k in table.index]
            for position, i in enumerate(order, 1):
                delta, se = paired_difference(lp[i][finite], lp[order[0]][finite])
                rows[i].update(rank=position, delta_per_point=delta, delta_se=se, num_compared=int(finite.sum()))
                rows[i].update(elpd_diff=float(table.loc[str(i), "elpd_diff"]), dse=float(table.loc[str(i), "dse"]))
            ranked = order
    for position, i in enumerate([i for i in range(len(lp)) if zero[i]], len(ranked) + 1):
        rows[i].update(rank=position, elpd_diff=math.inf, delta_per_point=-math.inf)


def _warn(row: dict, text: str) -> None:
    row["warnings"] = f"{text}; {row['warnings']}" if row["warnings"] else text


def _rank_guides(cells: list[dict], rows: list[dict]) -> None:
    """Rank guides within group × prior × likelihood × objective × seed by inference gap, then k̂ median."""
    sets: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok" and r["guide"]:
            sets.setdefault(_guide_set(r), []).append(r)
    for members in sets.values():
        ordered = sorted(members, key=lambda r: (_nan_last(r["inference_gap"]), _nan_last(r["khat_median"])))
        for k, r in enumerate(ordered, 1):
            r["guide_rank"] = k


def _guide_set(r: Any) -> str:
    return json.dumps([r["group"], r["prior"], r["likelihood"], r["objective"], str(r["seed"])])


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def verdict(df: Any) -> list[str]:
    """Plain sentences, most important first, from a :func:`build_table` frame."""
    out: list[str] = []
    ok = df[df["status"] == "ok"]
    groups = list(dict.fromkeys(ok["group"]))
    for group in groups:
        g = ok[(ok["group"] == group) & ok["rank"].notna()].sort_values("rank")
        if g.empty:
            continue
        best = g.iloc[0]
        bits = f", {best['bits_per_dim']:.4f} bits/dim" if not math.isnan(best["bits_per_dim"]) else ""
        where = f" ({group})" if len(groups) > 1 else ""
        line = (
            f"Best model{where}: {best['cell']}, log p̂ = {best['log_px']:.2f} ± {best['log_px_se']:.2f} nats per "
            f"test datapoint{bits} ({best['estimator']})."
        )
        if len(g) > 1:
            line += " " + _runner_up(best, g.iloc[1])
        out.append(line)
        out += _factor_lines(g)
    for guide_line in _guide_lines(ok):
        out.append(guide_line)
    failed = df[df["status"] == "failed"]
    if len(failed):
        names = "; ".join(f"{r['cell']} ({str(r['error'])[:120]})" for _, r in failed.iterrows())
        out.append(f"{len(failed)} of {len(df)} cells failed and are not ranked: {names}.")
    if len(groups) > 1:
        out.append(f"{len(groups)} comparability groups: their scores are different quantities and are not ranked "
                   "against each other.")  # fmt: skip
    return out


def _runner_up(best: Any, second: Any) -> str:
    """How far the runner-up is behind, and whether that is decided given the paired se and the bounds' looseness."""
    diff, dse = second["elpd_diff"], second["dse"]
    z = 0.0 if diff == 0 else diff / dse if dse > 0 else math.inf
    text = (
        f"Runner-up {second['cell']} is {abs(second['delta_per_point']):.2f} ± {second['delta_se']:.2f} nats per "
        "datapoint behind"
    )
    if z < 2:
        return text + ": not distinguishable from it (difference < 2 paired se)."
    # IWAE log p̂ is a lower bound whose slack is about the inference gap when k̂ is large; the paired se does not
    # see that bias, so a difference smaller than the cells' gaps is not decided by these estimates.
    loose = max(best["khat_share"], second["khat_share"]) > 0.5
    slack = max(best["inference_gap"], second["inference_gap"])
    if loose and abs(second["delta_per_point"]) < slack:
        return (
            text + f" ({z:.1f} paired se), but not decided: PSIS k̂ is above its threshold on most datapoints, so "
            f"both log p̂ are loose lower bounds whose slack (inference gaps up to {slack:.1f} nats) exceeds the "
            "difference; better guides or more samples are needed to order them."
        )
    return text + f": clearly behind ({z:.1f} paired se)."


def _factor_lines(g: Any) -> list[str]:
    """For prior and likelihood: which choice has the highest log p̂ with the other choices held fixed, how often."""
    lines = []
    for axis in ("likelihood", "prior"):
        if g[axis].nunique() < 2:
            continue
        others = [k for k in _PARTS if k != axis]
        wins: dict[str, int] = {}
        margins: dict[str, list[float]] = {}
        sets = 0
        for _, m in g.groupby([g[k].astype(str) for k in others]):
            if len(m) < 2:
                continue
            m = m.sort_values("log_px", ascending=False)
            sets += 1
            winner = str(m[axis].iloc[0])
            wins[winner] = wins.get(winner, 0) + 1
            margins.setdefault(winner, []).append(float(m["log_px"].iloc[0] - m["log_px"].iloc[1]))
        if not sets:
            continue
        top = max(wins, key=lambda k: wins[k])
        held = " × ".join(k for k in others if g[k].nunique() > 1) or "the other choices"
        lines.append(
            f"{axis.capitalize()}: {top} has the highest log p̂ in {wins[top]} of {sets} comparisons with {held} held "
            f"fixed (by {min(margins[top]):.2f} to {max(margins[top]):.2f} nats per datapoint over the next)."
        )
    return lines


def _guide_lines(ok: Any) -> list[str]:
    lines: list[str] = []
    winners: list[tuple[str, str]] = []
    sets: dict[str, list[Any]] = {}
    for _, r in ok[ok["guide_rank"].notna()].iterrows():
        sets.setdefault(_guide_set(r), []).append(r)
    for members in sets.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda r: r["guide_rank"])
        best, rivals = members[0], members[1:]
        parts = [str(best["prior"]), str(best["likelihood"])]
        parts += [str(best["objective"])] if ok["objective"].nunique() > 1 else []
        parts += [f"seed {best['seed']}"] if ok["seed"].nunique() > 1 else []
        where = " · ".join(parts)
        others = ", ".join(f"{r['guide']} {r['inference_gap']:.2f}" for r in rivals)
        lines.append(
            f"Under {where}, the {best['guide']} guide is closest to its decoder's posterior: inference gap "
            f"{best['inference_gap']:.2f} nats (others: {others}), median k̂ {best['khat_median']:.2f}."
        )
        winners.append((str(best["guide"]), where))
    if len(lines) <= 3:
        return lines
    # Many prior × likelihood sets: one sentence; per-set ranks are in the guide_rank column.
    counts: dict[str, list[str]] = {}
    for guide, where in winners:
        counts.setdefault(guide, []).append(where)
    ordered = sorted(counts.items(), key=lambda kv: -len(kv[1]))
    head = f"{ordered[0][0]} under {len(ordered[0][1])} of {len(winners)}"
    rest = "; ".join(f"{g} under {len(w)} ({', '.join(w)})" for g, w in ordered[1:])
    return [
        f"Guides, by closeness to their decoder's posterior (inference gap; guide_rank column): {head} prior × "
        f"likelihood pairs" + (f"; {rest}." if rest else ".")
    ]
