"""Figures: mean curves with 95% bands over seeds (matplotlib, optional)."""

from __future__ import annotations

import math

from .stats import curve_ci, smooth


def _figure(width: float, height: float):
    """A matplotlib Figure outside pyplot (no backend or global state is touched), or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(width, height))


def _save(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _band(ax, curves, label, window=1, color=None, x=None, floor=None, log=False):
    """Mean curve and its pointwise 95% band (cut at ``floor`` for quantities that cannot go below it).

    ``log=True``: geometric mean and the interval of the mean log, for positive curves on a log axis."""
    curves = [smooth(c, window) for c in curves]
    if log:
        curves = [[math.log(max(v, 1e-300)) for v in c] for c in curves]
    mean, half = curve_ci(curves)
    x = list(range(1, len(mean) + 1)) if x is None else x
    if log:
        lo = [math.exp(m - h) for m, h in zip(mean, half, strict=False)]
        hi = [math.exp(m + h) for m, h in zip(mean, half, strict=False)]
        mean = [math.exp(m) for m in mean]
    else:
        lo = [m - h if floor is None else max(floor, m - h) for m, h in zip(mean, half, strict=False)]
        hi = [m + h for m, h in zip(mean, half, strict=False)]
    (line,) = ax.plot(x, mean, label=label, color=color, lw=1.4)
    if len(curves) > 1:
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    return line


def training_curves(groups: dict[str, list[dict]], path: str, title: str, kl_label: str):
    """Reward and KL curves, one line per loss, mean ± 95% band over seeds (10-step moving average)."""
    fig = _figure(11, 4)
    if fig is None:
        return None
    ax_r, ax_k = fig.subplots(1, 2)
    n = len(next(iter(groups.values())))
    for name, runs in groups.items():
        _band(ax_r, [r["rewards"] for r in runs], name, window=10)
        _band(ax_k, [r["kls"] for r in runs], name, window=10, floor=0.0)
    ax_r.set(title=f"{title}: reward (mean ± 95% CI, {n} seeds)", xlabel="step (batch)", ylabel="mean reward")
    ax_k.set(title=kl_label, xlabel="step (batch)", ylabel="KL (nats per string)")
    ax_r.legend(loc="lower right", fontsize=8)
    ax_r.grid(alpha=0.3)
    ax_k.grid(alpha=0.3)
    return _save(fig, path)


def offpolicy_figure(summary: dict, betas, promise, forward, oracle: dict, path: str | None):
    """(a) KL attained vs β against the promised KL; (b) reward vs KL; (c) the oracle's gradient error.

    ``summary`` maps (penalty, β, steps per batch) to ``{"kl": (mean, half-width), "reward": (...)}`` over
    seeds; ``promise`` and ``forward`` map β to the (reward, KL) of the reverse- and forward-KL optima.
    Returns the Figure (None without matplotlib).
    """
    fig = _figure(16, 4.8)
    if fig is None:
        return None
    ax_kl, ax_tr, ax_or = fig.subplots(1, 3)
    fine = [betas[0] * (betas[-1] / betas[0]) ** (i / 60) for i in range(61)]
    ax_kl.axhline(1.0, color="k", lw=1.2, label="promise kept: argmax E[r] − β·KL(π‖π_ref)")
    ax_kl.plot(
        fine,
        [forward(b)[1] / promise(b)[1] for b in fine],
        "k:",
        lw=1.2,
        label="argmax E[r] − β·KL(π_ref‖π) (forward KL)",
    )
    arms = list(dict.fromkeys((name, reuse) for name, _, reuse in summary))
    labels = list(dict.fromkeys(name for name, _ in arms))
    colors = {name: f"C{i}" for i, name in enumerate(labels)}
    for k, (name, reuse) in enumerate(arms):
        pts = [(b, summary[(name, b, reuse)]) for b in betas if (name, b, reuse) in summary]
        kl = [s["kl"] for _, s in pts]
        reward = [s["reward"] for _, s in pts]
        dodge = [b * 1.04 ** (k - (len(arms) - 1) / 2) for b, _ in pts]
        promised = [promise(b)[1] for b, _ in pts]
        style = {"color": colors[name], "ms": 5, "capsize": 2, "lw": 1, "mfc": "white" if reuse == 1 else colors[name]}
        marker = "s" if reuse == 1 else "^" if name.endswith(", no clip") else "o"
        ax_kl.errorbar(
            dodge,
            [m / p for (m, _), p in zip(kl, promised, strict=False)],
            yerr=[_zero(h) / p for (_, h), p in zip(kl, promised, strict=False)],
            fmt=marker,
            **style,
            label=f"{name}, {'on-policy' if reuse == 1 else f'{reuse} steps/batch'}",
        )
        ax_tr.errorbar(
            [m for m, _ in kl],
            [m for m, _ in reward],
            xerr=[_zero(h) for _, h in kl],
            yerr=[_zero(h) for _, h in reward],
            fmt=marker,
            **style,
        )
    ax_kl.set(
        xscale="log",
        xlabel="β",
        ylabel="attained KL / promised KL (end of training)",
        title="(a) the KL each penalty attains at equal β",
    )
    ax_kl.set_xticks(list(betas), [str(b) for b in betas])
    ax_kl.minorticks_off()
    ax_kl.legend(fontsize=6.5, loc="upper left")
    frontier = [promise(b) for b in fine]
    ax_tr.plot([k for _, k in frontier], [r for r, _ in frontier], "k-", lw=1.2, label="best reward for its KL")
    for b in betas:
        r, k = promise(b)
        ax_tr.annotate(f"β={b}", (k, r), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax_tr.set(
        xlabel="KL(π_θ‖π_ref) per string",
        ylabel="reward, end of training",
        title="(b) reward–KL trade-off (points: β values)",
    )
    ax_tr.legend(fontsize=7, loc="lower right")
    kl_old = [sum(c) / len(c) for c in zip(*oracle["kl_old"], strict=False)]
    for i, name in enumerate(n for n in oracle if n not in ("distance", "kl_old")):
        curves = [[max(e, 1e-17) for e in row] for row in oracle[name]["reverse"]]
        _band(ax_or, curves, name, color=colors.get(name, f"C{i}"), x=kl_old, log=True)
    ax_or.set_xscale("symlog", linthresh=1e-3)
    ax_or.set(
        yscale="log",
        xlabel="KL(π_θ‖π_old) per token (how stale the batch is)",
        ylabel="‖E_old[∇ℓ] − ∇KL(π_θ‖π_ref)‖ / ‖∇KL‖",
        title="(c) exact expected gradient of each penalty",
    )
    ax_or.legend(fontsize=7)
    for ax in (ax_kl, ax_tr, ax_or):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _zero(h: float) -> float:
    return 0.0 if math.isnan(h) else h


def distill_figure(groups: dict[str, list[dict]], path: str, title: str):
    fig = _figure(11, 4)
    if fig is None:
        return None
    ax_r, ax_k = fig.subplots(1, 2)
    n = len(next(iter(groups.values())))
    for i, (name, runs) in enumerate(groups.items()):
        _band(ax_r, [r["rewards"] for r in runs], name, window=10, color=f"C{i}")
        if name != "reward":
            _band(ax_k, [r["kls"] for r in runs], name, window=10, color=f"C{i}", log=True)
    ax_r.set(
        title=f"{title}: student reward (mean ± 95% CI, {n} seeds)",
        xlabel="step (batch of samples)",
        ylabel="mean reward",
    )
    ax_k.set(
        title="KL(student ‖ its teacher) per string, geometric mean",
        xlabel="step (batch of samples)",
        ylabel="KL (nats)",
        yscale="log",
    )
    ax_r.legend(loc="lower right", fontsize=8)
    ax_r.grid(alpha=0.3)
    ax_k.grid(alpha=0.3)
    return _save(fig, path)
