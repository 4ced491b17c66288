"""Figures of the toy experiments, after the paper's: subnetwork parameter maps (Figs 3, 5, 8),
TMS encoder directions (Fig. S2), intervention curves per sample group and per output (Figs 4, 9,
S8), the two-subnetwork grid (Fig. S9), coefficient scatter (Fig. 6), the one-hot probe, loss vs
rank / count (Figs S5, S11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps

from l3d.decomposition import Decomposition
from l3d.experiments.metrics import dense_directions
from l3d.experiments.registry import ExperimentSpec
from l3d.plots import save, subplots
from l3d.toys import TMS
from l3d.toys.registry import Toy

TAB10 = colormaps["tab10"]


def subnetwork_maps(decomposition: Decomposition, result: dict, path: Path, max_rows: int = 16):
    """One row per subnetwork (ordered by the unit it was matched to), one panel per tensor: the
    subnetwork's entries (signed; matrices as images, vectors as one-row images)."""
    directions = {n: d.numpy() for n, d in dense_directions(decomposition).items()}
    assignment = result["recovery"]["assignment"]
    order = assignment + [k for k in range(decomposition.n_subnetworks) if k not in assignment]
    order = order[:max_rows]
    p_act = result["p_active"]
    names = list(directions)
    fig, axes = subplots(
        len(order),
        len(names),
        figsize=(1.8 * len(names) + 1, 1.1 * len(order) + 0.6),
        squeeze=False,
    )
    for row, k in enumerate(order):
        unit = assignment.index(k) if k in assignment else None
        for col, name in enumerate(names):
            ax = axes[row, col]
            d = directions[name][k]
            d = d[None, :] if d.ndim == 1 else d.reshape(d.shape[0], -1)
            lim = max(np.abs(d).max(), 1e-12)
            ax.imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
        label = f"v{k}" + (f"→u{unit}" if unit is not None else "") + f"\nP={p_act[k]:.2f}"
        axes[row, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("Subnetworks (V_out), rows matched to units", fontsize=9)
    save(fig, path)


def encoder_directions(model: TMS, decomposition: Decomposition, result: dict, path: Path):
    """TMS 5-2: each feature's embedding W_in[:, j] and the matched subnetwork's W_in column j."""
    w = model.W_in.detach().numpy()
    v = dense_directions(decomposition)["W_in"].numpy()
    assignment = result["parameter_recovery"]["assignment"]
    fig, ax = subplots(figsize=(4, 4))
    colors = TAB10(np.arange(w.shape[1]) % 10)
    for j, k in enumerate(assignment):
        ax.arrow(0, 0, *w[:, j], color=colors[j], width=0.01, alpha=0.4, length_includes_head=True)
        col = v[k][:, j]
        col = col / max(np.linalg.norm(col), 1e-12) * np.linalg.norm(w[:, j])
        col = col * np.sign(col @ w[:, j] or 1.0)
        ax.plot(*np.stack([[0, 0], col]).T, "--", color=colors[j], lw=2, label=f"f{j}: v{k}")
    lim = np.abs(w).max() * 1.2
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Encoder: model (arrows) vs subnetwork (dashed)", fontsize=9)
    save(fig, path)


def intervention_plot(result: dict, path: Path):
    """Mean |Δ output| on each unit's samples (solid) and on the rest (dashed) vs delta."""
    data = result["intervention_curves"]
    fig, ax = subplots(figsize=(5, 3.5))
    for i, c in enumerate(data["curves"]):
        color = TAB10(i % 10)
        ax.plot(
            data["deltas"], c["matched"], color=color, label=f"u{c['unit']} (v{c['subnetwork']})"
        )
        ax.plot(data["deltas"], c["others"], "--", color=color)
    ax.set_xlabel("δ along the unit's subnetwork")
    ax.set_ylabel("mean |Δ output|")
    ax.set_title("Interventions: unit's samples (solid) vs others (dashed)", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, path)


def output_intervention_plot(result: dict, path: Path):
    """Fig. 9 read output-wise: for each unit (panel), the mean |Δ output_i| on the unit's samples
    of every output i as δ sweeps along the unit's subnetwork; the unit's own output in colour,
    the others in grey. A second row intervenes on the hidden layers only (Fig. S8)."""
    data = result["intervention_curves"]
    curves = data["curves"]
    keys = [k for k in ("per_output", "per_output_hidden_only") if k in curves[0]]
    titles = {"per_output": "all tensors", "per_output_hidden_only": "hidden layers only"}
    fig, axes = subplots(
        len(keys), len(curves), figsize=(2.6 * len(curves), 2.4 * len(keys)), squeeze=False
    )
    for row, key in enumerate(keys):
        for col, c in enumerate(curves):
            ax = axes[row, col]
            changes = np.array(c[key])  # (n_deltas, n_outputs)
            for i in range(changes.shape[1]):
                if i != c["unit"]:
                    ax.plot(data["deltas"], changes[:, i], color="0.6", lw=0.8)
            ax.plot(data["deltas"], changes[:, c["unit"]], color=TAB10(col % 10), lw=2)
            ax.set_title(f"u{c['unit']} (v{c['subnetwork']}), {titles[key]}", fontsize=8)
            ax.set_xlabel("δ", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[row, 0].set_ylabel("mean |Δ output_i|", fontsize=8)
    fig.suptitle(
        "Interventions on the unit's samples: own output (colour) vs others (grey)", fontsize=9
    )
    save(fig, path)


def grid_plot(result: dict, path: Path):
    grid = result["intervention_grid"]
    panels = ["only_first", "only_second", "neither"]
    fig, axes = subplots(1, 3, figsize=(10, 3.2))
    deltas = grid["deltas"]
    vmax = max(np.max(grid[p]) for p in panels)
    for ax, p in zip(axes, panels):
        im = ax.imshow(
            np.array(grid[p]),
            origin="lower",
            extent=[deltas[0], deltas[-1], deltas[0], deltas[-1]],
            vmin=0,
            vmax=vmax,
            cmap="viridis",
        )
        ax.set_title(p.replace("_", " ") + " active", fontsize=9)
        ax.set_xlabel(f"δ on v{grid['subnetworks'][1]} (u{grid['units'][1]})")
        ax.set_ylabel(f"δ on v{grid['subnetworks'][0]} (u{grid['units'][0]})")
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean |Δ output|")
    save(fig, path, tight=False)


def probe_plot(result: dict, path: Path):
    att = np.array(result["one_hot_probe"]["attribution"])
    fig, ax = subplots(figsize=(min(1 + 0.35 * att.shape[1], 14), min(1 + 0.35 * att.shape[0], 14)))
    ax.imshow(att, cmap="Greys", vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel("subnetwork")
    ax.set_ylabel("one-hot unit")
    errs = result["one_hot_probe"]["errors"]
    ax.set_title(f"One-hot probe |c| (row-normalised); errors@0.1 = {errs['0.1']}", fontsize=9)
    save(fig, path)


def coefficient_scatter(result: dict, path: Path):
    coef = result["coefficients"]
    est, true = np.array(coef["a_hat"]).ravel(), np.array(coef["a_true"]).ravel()
    fig, ax = subplots(figsize=(4, 4))
    ax.scatter(true, est, s=8)
    ax.set_xlabel("true A entry")
    ax.set_ylabel("â from the subnetwork (eq. 12)")
    ax.set_title(f"Coefficient recovery: r = {coef['pearson_r']:.3f}", fontsize=9)
    save(fig, path)


def training_curve(result: dict, path: Path):
    hist = result["history"]
    fig, ax = subplots(figsize=(5, 3))
    epochs = [h["epoch"] for h in hist]
    ax.plot(epochs, [h["loss_pooled_squared"] for h in hist], label="pooled squared")
    ax.plot(epochs, [h["loss_paper"] for h in hist], label="eq. 8")
    for r in result["resampled"]:
        ax.axvline(r["epoch"], color="grey", lw=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    save(fig, path)


def seed_figures(
    spec: ExperimentSpec, toy: Toy, decomposition: Decomposition, result: dict, out: Path
):
    out.mkdir(parents=True, exist_ok=True)
    subnetwork_maps(decomposition, result, out / "subnetworks.png")
    training_curve(result, out / "training.png")
    intervention_plot(result, out / "interventions.png")
    if "per_output" in result["intervention_curves"]["curves"][0]:
        output_intervention_plot(result, out / "interventions_per_output.png")
    probe_plot(result, out / "probe.png")
    if "intervention_grid" in result:
        grid_plot(result, out / "intervention_grid.png")
    if spec.tms_masks and isinstance(toy.model, TMS) and toy.model.W_in.shape[0] == 2:
        encoder_directions(toy.model, decomposition, result, out / "encoder_directions.png")
    if "coefficients" in result:
        coefficient_scatter(result, out / "coefficients.png")


def experiment_figures(spec: ExperimentSpec, report: dict, out: Path):
    """Across seeds: loss vs the swept setting (mean ± std)."""
    sweeps = [r["sweep"] for r in report["seeds"] if "sweep" in r]
    if not sweeps:
        return
    key = sweeps[0]["key"]
    xs = [p[key] for p in sweeps[0]["points"]]
    losses = np.array([[p["loss_pooled_squared"] for p in s["points"]] for s in sweeps])
    fig, ax = subplots(figsize=(4.5, 3.2))
    ax.errorbar(xs, losses.mean(0), yerr=losses.std(0), marker="o", capsize=3)
    ax.set_xlabel(key.replace("n_subnetworks", "number of subnetworks"))
    ax.set_ylabel("held-out pooled squared loss")
    ax.set_title(f"{spec.name}: loss vs {key}", fontsize=9)
    save(fig, out / f"loss_vs_{key}.png")
