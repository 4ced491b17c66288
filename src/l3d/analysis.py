"""What each subnetwork does on real data (Sections 2.5 and 3.5): impact, top samples, top logits,
P_act and interventions, written to a run folder as JSON plus Markdown and PNG.

A sample is one row of `Decomposition.coefficients`: an input, or with per_token a valid
(sequence, position) pair. Everything here works in chunks of inputs, so any dataset fits in memory.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l3d import io
from l3d.core.samples import Inputs, SampleRows, batch_size_of
from l3d.decomposition import Decomposition
from l3d.errors import L3DError

# Samples: addressing rows of the coefficient matrix ------------------------------------------


def top_samples(impact: Tensor, n_top: int) -> Tensor:
    """(n_v, n_top) sample indices of largest impact per subnetwork, largest first."""
    n_top = min(n_top, impact.shape[0])
    return impact.topk(n_top, dim=0).indices.T


def top_sample_purity(impact: Tensor, labels: Sequence[Any], n_top: int) -> Tensor:
    """(n_v,) fraction of each subnetwork's n_top highest-impact samples that share their most
    common label: 1 means the subnetwork's top samples all come from one class or task."""
    if len(labels) != impact.shape[0]:
        raise L3DError(f"{len(labels)} labels for {impact.shape[0]} samples: give one per sample")
    top = top_samples(impact, n_top)
    return torch.tensor(
        [Counter(labels[int(i)] for i in row).most_common(1)[0][1] / len(row) for row in top]
    )


# Top logits ----------------------------------------------------------------------------------


def top_logits(
    decomposition: Decomposition,
    inputs: Inputs,
    k: int,
    samples: Tensor,
    n_logits: int = 10,
    direction: dict[str, Tensor] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The outputs subnetwork k pushes up and down on its samples: the mean over `samples` of
    d softmax / dδ along V_out_k, its n_logits largest ('positive') and most negative ('negative')
    entries as (indices, values), positive and negative values only. A direction's sign is arbitrary,
    so both lists matter."""
    mean = decomposition.output_derivative(inputs, k, samples, direction).mean(0)
    n_logits = min(n_logits, mean.numel())
    pos, neg = mean.topk(n_logits), (-mean).topk(n_logits)
    up, down = pos.values > 0, neg.values > 0
    return {
        "positive": (pos.indices[up], pos.values[up]),
        "negative": (neg.indices[down], -neg.values[down]),
    }


# Interventions -------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    decomposition: Decomposition,
    tokenizer: Any,
    prompt: str,
    k: int | None = None,
    delta: float = 0.0,
    max_new_tokens: int = 20,
) -> str:
    """Greedy continuation of `prompt` by the LM at W0 + δ v_k (at W0 when k is None)."""
    model = decomposition.model
    if not hasattr(model, "generate"):
        raise L3DError(
            f"{type(model).__name__} has no .generate(): text generation needs a causal LM"
        )
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(decomposition.device)

    def run() -> str:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=getattr(tokenizer, "pad_token_id", None),
        )
        return tokenizer.decode(out[0, ids.shape[1] :].tolist())

    if k is None:
        return run()
    with decomposition.perturbed(k, delta):
        return run()


# Writing the run folder ----------------------------------------------------------------------


def _random_samples(positions: Tensor, n: int, seed: int) -> Tensor:
    """About n random samples from whole random inputs: every input costs a forward pass however
    many of its tokens are used, so per-token samples come from as few sequences as possible."""
    generator = torch.Generator().manual_seed(seed)
    rows = positions[:, 0]
    chosen = torch.zeros(len(rows), dtype=torch.bool)
    for row in torch.randperm(int(rows.max()) + 1, generator=generator).tolist():
        chosen |= rows == row
        if int(chosen.sum()) >= n:
            break
    return torch.nonzero(chosen).flatten()


def _sample_labels(labels: Sequence[Any] | None, inputs: Inputs, positions: Tensor) -> list | None:
    """Labels per sample from labels per input (broadcast to its tokens) or per sample."""
    if labels is None:
        return None
    labels = labels.tolist() if isinstance(labels, Tensor) else list(labels)
    if len(labels) == positions.shape[0]:
        return labels
    if len(labels) == batch_size_of(inputs):
        return [labels[int(r)] for r in positions[:, 0]]
    raise L3DError(
        f"{len(labels)} labels for {batch_size_of(inputs)} inputs and {positions.shape[0]} "
        "samples: give one label per input or per sample"
    )


def _name(label: Any, class_names: Sequence[str] | None) -> str:
    if class_names is not None and isinstance(label, int) and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _is_image_batch(inputs: Inputs, per_token: bool) -> bool:
    return (
        isinstance(inputs, Tensor)
        and not per_token
        and inputs.dim() == 4
        and inputs.shape[1] in (1, 3)
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def _save_image(image: Tensor, path: Path) -> None:
    plt = _pyplot()

    x = image.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)  # inputs are often normalised
    array = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
    plt.imsave(path, array, cmap="gray" if x.shape[0] == 1 else None)


def _plot_grid(images: list[Tensor], titles: list[str], path: Path, title: str) -> None:
    plt = _pyplot()

    cols = min(5, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, titles):
        x = image.detach().float().cpu()
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
        ax.imshow(x[0] if x.shape[0] == 1 else x.permute(1, 2, 0), cmap="gray")
        ax.set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_p_active(p_active: Tensor, path: Path) -> None:
    plt = _pyplot()

    order = p_active.argsort(descending=True)
    values = p_active[order]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.06 * len(values) + 2), 3))
    colors = ["tab:red" if v == 0 else "tab:blue" for v in values]
    ax.bar(range(len(values)), values.numpy(), color=colors, width=0.9)
    ax.set_xlabel("subnetwork (sorted by P_act; dead in red)")
    ax.set_ylabel("P_act")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎").replace("`", "'")


def write_analysis(
    decomposition: Decomposition,
    inputs: Inputs,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    labels: Sequence[Any] | None = None,
    class_names: Sequence[str] | None = None,
    n_top: int = 10,
    n_references: int = 10,
    n_logits: int = 10,
    intervention_scale: float = 0.02,
    baseline: bool = True,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Analyse every subnetwork on `inputs` and write out_dir/analysis.json, analysis.md,
    p_active.png, impact.safetensors (the full impact matrix (n_samples, n_v), the samples'
    (input, position), and the random baseline's impact), and for images images/ and grids/.
    Returns the analysis.json content.

    tokenizer: decodes token ids (anything with .decode(list[int])) for per-token samples.
    labels: a class or task per input or per sample; enables top-sample purity, compared with
        random directions of the same ranks when baseline=True.
    class_names: names for integer labels and for the model's output classes.
    intervention_scale: interventions use δ = ±scale · ‖W0‖ (norm of the decomposed tensors) and
        report KL(p(W0) ‖ p(W0 + δ v_k)) on the subnetwork's top samples and on random samples;
        selectivity is the larger of the first over the larger of the second (0.02 gave the most
        selective interventions on the digits demo; far larger steps leave the local regime).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_token = decomposition.config.per_token
    positions = SampleRows.of(inputs, per_token).positions(batch_size_of(inputs))
    sample_labels = _sample_labels(labels, inputs, positions)
    is_image = _is_image_batch(inputs, per_token)

    directions = [decomposition.subnetworks.v_in]
    if baseline and sample_labels is not None:
        directions.append(decomposition.subnetworks.v_out.random_like(seed + 1))
    measured = decomposition.impacts(
        inputs,
        directions,
        n_references=n_references,
        seed=seed,
        chunk_size=chunk_size,
        progress=progress,
    )
    impact = measured[0]
    n_samples, n_v = impact.shape
    top = top_samples(impact, n_top)
    p_active = decomposition.p_active.cpu()
    delta = intervention_scale * decomposition.weight_norm()
    random_samples = _random_samples(positions, max(4 * n_top, 64), seed)

    def logit_label(i: int) -> str:
        if tokenizer is not None and per_token:
            return tokenizer.decode([i])
        return _name(i, class_names)

    with torch.no_grad():
        dense = decomposition.subnetworks.v_out.materialize()  # once: (n_v, *shape) per tensor
    saved_images: dict[int, str] = {}
    if is_image:
        (out / "images").mkdir(exist_ok=True)
        (out / "grids").mkdir(exist_ok=True)

    records = []
    for k in range(n_v):
        samples = []
        for s in top[k].tolist():
            row, pos = (int(v) for v in positions[s])
            entry: dict[str, Any] = {
                "sample": s,
                "impact": float(impact[s, k]),
                "text": None,
                "token": None,
                "image": None,
                "label": None if sample_labels is None else _name(sample_labels[s], class_names),
            }
            if per_token:
                ids = (inputs["input_ids"] if isinstance(inputs, dict) else inputs)[row].tolist()
                entry["input"], entry["position"] = row, pos
                if tokenizer is not None:
                    entry["text"] = tokenizer.decode(ids[:pos])
                    entry["token"] = tokenizer.decode([ids[pos]])
                else:
                    entry["token"] = str(ids[pos])
            if is_image:
                if row not in saved_images:
                    saved_images[row] = f"images/sample_{row:06d}.png"
                    _save_image(inputs[row], out / saved_images[row])
                entry["image"] = saved_images[row]
            samples.append(entry)
        direction = {n: d[k] for n, d in dense.items()}
        logits = top_logits(decomposition, inputs, k, top[k], n_logits, direction)
        # Top and random samples in one pass: a forward at W0 and one per δ.
        both = torch.cat([top[k], random_samples])
        effects = decomposition.output_change(inputs, k, (-delta, delta), both, direction)
        effect_top = effects[:, : len(top[k])].mean(1).tolist()
        effect_all = effects[:, len(top[k]) :].mean(1).tolist()
        records.append(
            {
                "index": k,
                "p_active": float(p_active[k]),
                "dead": bool(p_active[k] == 0),
                "mean_impact": float(impact[:, k].mean()),
                "top_samples": samples,
                "top_logits": {
                    sign: [
                        {"label": logit_label(int(i)), "index": int(i), "value": float(v)}
                        for i, v in zip(*logits[sign])
                    ]
                    for sign in ("positive", "negative")
                },
                "intervention": {
                    "delta": delta,
                    "top_samples": {"minus": effect_top[0], "plus": effect_top[1]},
                    "random_samples": {"minus": effect_all[0], "plus": effect_all[1]},
                    "selectivity": max(effect_top) / max(max(effect_all), 1e-30),
                },
            }
        )
        if is_image:
            _plot_grid(
                [inputs[int(positions[s, 0])] for s in top[k].tolist()],
                [f"{e['label'] or ''} {e['impact']:.2g}".strip() for e in samples],
                out / "grids" / f"subnetwork_{k:03d}.png",
                f"subnetwork {k}: P_act {float(p_active[k]):.3f}",
            )
            records[-1]["grid"] = f"grids/subnetwork_{k:03d}.png"

    records.sort(key=lambda r: -r["p_active"])
    summary: dict[str, Any] = {
        "n_samples": n_samples,
        "n_subnetworks": n_v,
        "n_dead": sum(r["dead"] for r in records),
        "n_references": n_references,
        "n_top": n_top,
        "per_token": per_token,
        "divergence": decomposition.config.divergence,
        "loss_paper": decomposition.evaluation.loss_paper,
        "loss_pooled_squared": decomposition.evaluation.loss_pooled_squared,
        "intervention_delta": delta,
        "median_intervention_selectivity": float(
            torch.tensor(
                [r["intervention"]["selectivity"] for r in records if not r["dead"]] or [0.0]
            ).median()
        ),
        "weight_norm": decomposition.weight_norm(),
        "change_label": decomposition.divergence.change_label,
        "derivative_label": decomposition.divergence.derivative_label,
    }
    if sample_labels is not None:
        live = p_active > 0
        purity = top_sample_purity(impact, sample_labels, n_top)
        for r in records:
            r["purity"] = float(purity[r["index"]])
        summary["purity"] = float(purity[live].mean()) if live.any() else 0.0
        summary["majority_label_fraction"] = Counter(sample_labels).most_common(1)[0][1] / n_samples
        if len(measured) > 1:
            summary["purity_random_directions"] = float(
                top_sample_purity(measured[1], sample_labels, n_top).mean()
            )
    result = {"summary": summary, "subnetworks": records}
    tensors = {"impact": impact, "sample_positions": positions}
    if len(measured) > 1:
        tensors["impact_random_directions"] = measured[1]
    io.save_tensors(out / "impact.safetensors", tensors)
    io.write_json(out / "analysis.json", result)
    _plot_p_active(p_active, out / "p_active.png")
    io.write_text(out / "analysis.md", _markdown(result, is_image))
    return result


def _markdown(result: dict, is_image: bool) -> str:
    s = result["summary"]
    lines = [
        "# Subnetwork analysis",
        "",
        f"{s['n_subnetworks']} subnetworks ({s['n_dead']} dead) on {s['n_samples']} samples; impact "
        f"averaged over {s['n_references']} references. Reconstruction loss: "
        f"{s['loss_paper']:.4f} (paper), {s['loss_pooled_squared']:.4f} (pooled squared).",
        "",
    ]
    if "purity" in s:
        lines += [
            f"Top-{s['n_top']} sample purity (share of the most common label), mean over live "
            f"subnetworks: **{s['purity']:.3f}**"
            + (
                f"; random directions of the same ranks: {s['purity_random_directions']:.3f}"
                if "purity_random_directions" in s
                else ""
            )
            + f"; most common label overall: {s['majority_label_fraction']:.3f}.",
            "",
        ]
    lines += ["![P_act per subnetwork](p_active.png)", ""]
    for r in result["subnetworks"]:
        flag = " — **dead**" if r["dead"] else ""
        purity = f", purity {r['purity']:.2f}" if "purity" in r else ""
        lines += [f"## Subnetwork {r['index']}: P_act {r['p_active']:.4f}{purity}{flag}", ""]
        if is_image and "grid" in r:
            lines += [f"![top images of subnetwork {r['index']}]({r['grid']})", ""]
        lines += ["| impact | sample | label |", "|---:|---|---|"]
        for e in r["top_samples"]:
            if e["token"] is not None:
                shown = f"{_cell(e['text'] or '')}**[{_cell(e['token'])}]**"
            elif e["image"] is not None:
                shown = f"![sample {e['sample']}]({e['image']})"
            else:
                shown = f"sample {e['sample']}"
            lines.append(f"| {e['impact']:.4g} | {shown} | {_cell(e['label'] or '')} |")
        what, change = s["derivative_label"], s["change_label"]
        up = ", ".join(
            f"`{_cell(t['label'])}` {t['value']:+.3g}" for t in r["top_logits"]["positive"]
        )
        down = ", ".join(
            f"`{_cell(t['label'])}` {t['value']:+.3g}" for t in r["top_logits"]["negative"]
        )
        i = r["intervention"]
        lines += [
            "",
            f"Pushes up ({what}): {up}",
            "",
            f"Pushes down: {down}",
            "",
            f"Intervention δ = ±{i['delta']:.3g}: {change} on top samples "
            f"{i['top_samples']['minus']:.3g} / {i['top_samples']['plus']:.3g}, on random samples "
            f"{i['random_samples']['minus']:.3g} / {i['random_samples']['plus']:.3g} "
            f"(selectivity {i['selectivity']:.3g}).",
            "",
        ]
    return "\n".join(lines)
