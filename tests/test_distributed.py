"""Data parallelism on torch.distributed (CPU, gloo): a run of 2 processes equals the single-process
run on the same global batches and seed, step by step, for an MLP (MSE) and a tiny GPT-Neo per
token (KL, padded sequences, a shard without samples); the batch top-k over the ranks keeps exactly
round(k N); evaluation and impact split over ranks equal the single process's; ranks that hold other
models are refused, and a failure of rank 0 stops the others. With sharded factors (FSDP2) the
same holds, and a sharded state resumes sharded, unsharded or in one process. One spawn of 2
processes runs every case (each start costs seconds); the single-process runs are the oracle."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import l3d
from l3d import runs
from l3d.config import L3DConfig
from l3d.core.algorithm import n_kept, select
from l3d.core.distributed import Group
from l3d.core.samples import as_inputs
from l3d.decomposition import build
from l3d.runs.checkpoint import flatten_state, unflatten_state

ATOL, RTOL = 1e-6, 1e-5
RUN_SPEC = {
    "model": {"python": "l3d.toys:TMS"},
    "data": {"toy": "tms"},
    "l3d": {"params": ["W_in"], "n_subnetworks": 2},
}
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def _mlp_data() -> torch.Tensor:
    # 43 samples in batches of 10: the last batch (3) splits 1 / 2 over the ranks.
    return torch.randn(43, 6, generator=torch.Generator().manual_seed(1))


MLP_CONFIGS = {
    # Cached Jacobians (the toys' path), with resampling between epochs.
    "mlp_jacobian": dict(gradient_method="auto", resample_every=2, resample_until=4),
    # The structured backend in sample chunks (two passes per step).
    "mlp_chunked": dict(gradient_method="structured", chunk_size=3),
    # Sharded factors: 5 subnetworks split 3 / 2 over the ranks; resampling edits the shards,
    # held-out evaluation reads them gathered.
    "mlp_sharded": dict(
        gradient_method="auto",
        n_subnetworks=5,
        resample_every=2,
        resample_until=4,
        resample_min_p_active=0.3,
        heldout_fraction=0.2,
    ),
}
SHARDED = {"mlp_sharded", "lm_sharded"}
RUNS = [*MLP_CONFIGS, "lm", "lm_empty_shard", "lm_sharded", "mlp_sharded_one"]


def _mlp_config(name: str) -> L3DConfig:
    fields: dict = dict(
        params=["0.weight", "2.weight"],
        n_subnetworks=6,
        rank=1,
        top_k=0.3,
        epochs=5,
        batch_size=10,
        lr=0.02,
        seed=3,
    )
    return L3DConfig.create(**{**fields, **MLP_CONFIGS[name]})


# Fewer subnetworks than ranks: sharding the subnetwork axis would leave a rank without one (a
# DTensor traceback at the first step); such factors stay whole.
ONE_SUBNETWORK = _mlp_config("mlp_sharded").replace(n_subnetworks=1, heldout_fraction=0.0)


def _lm(folder: Path) -> nn.Module:
    from l3d import hf

    return hf.load_causal_lm(folder / "lm")


def _lm_data() -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 15, (7, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    for row, length in enumerate([8, 5, 8, 3, 6, 8, 2]):  # padded on the right
        mask[row, length:] = 0
        ids[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _lm_batches() -> list[dict[str, torch.Tensor]]:
    """Batches used as given: in the first, rank 1's shard (the second sequence) is all padding,
    so it has no samples and takes part in the step with empty gradients."""
    data = _lm_data()
    first = {k: v[:2].clone() for k, v in data.items()}
    first["attention_mask"][1] = 0
    return [first, {k: v[2:5] for k, v in data.items()}]


def _lm_config() -> L3DConfig:
    return L3DConfig.create(
        params=["transformer.h.1.attn.attention.*_proj.weight"],
        n_subnetworks=4,
        rank=1,
        top_k=0.2,
        epochs=3,
        batch_size=3,
        lr=0.01,
        seed=5,
        divergence="kl",
        per_token=True,
    )


def _decompose(model: nn.Module, data, config: L3DConfig, shard_factors: bool = False) -> dict:
    """A run's per-step losses, top-k counts and sample counts, its factors, its final
    evaluation, a held-out evaluation and impacts: everything a rank's result is compared on."""
    steps: list[list[float]] = []

    def on_step(r) -> None:
        steps.append(
            [
                float(r.losses.paper),
                float(r.losses.pooled_squared),
                int(r.active.sum()),
                r.n_samples,
            ]
        )

    d = l3d.run(
        model, data, config, progress=False, step_callback=on_step, shard_factors=shard_factors
    )
    ev = d.evaluate(data, seed=11)
    tensors = {f"factor/{k}": v.detach() for k, v in d.subnetworks.state_dict().items()}
    tensors["p_active"] = d.p_active
    tensors["eval_p_active"] = ev.p_active
    tensors["impact"] = d.impact(as_inputs(data), n_references=2, chunk_size=2)
    return {
        "tensors": tensors,
        "steps": steps,
        "evaluation": [d.evaluation.loss_paper, d.evaluation.loss_pooled_squared],
        "held_out": [ev.loss_paper, ev.loss_pooled_squared, ev.n_samples],
        "history": [[r["loss_paper"], r["loss_pooled_squared"]] for r in d.history],
        "heldout": [r.get("loss_heldout_paper", 0.0) for r in d.history],
        "resampled": [r.get("resampled", []) for r in d.history],
    }


def _states(shard_first: bool, shard_then: bool, state: dict | None = None) -> dict:
    """Two epochs of the sharded MLP run (sharded or not), its state through the checkpoint
    format, then the rest of the run resumed from it (sharded or not): the final state, and the
    state after two epochs. With `state`, only the resumed part, from that state."""
    config = _mlp_config("mlp_sharded")
    if state is None:
        trainer = build(_mlp(), _mlp_data(), config, progress=False, shard_factors=shard_first)[2]
        for _ in range(2):
            trainer.run_epoch()
        state = unflatten_state(*flatten_state(trainer.state_dict()))
    trainer = build(_mlp(), _mlp_data(), config, progress=False, shard_factors=shard_then)[2]
    trainer.load_state_dict(state)
    while trainer.epoch < config.epochs:
        trainer.run_epoch()
    final = trainer.state_dict()
    return {
        "middle": state,
        "final": flatten_state(final)[0],
        "resampled": [r.get("resampled", []) for r in final["history"]],
    }


def _global_top_k(rank: int) -> dict:
    """Uneven shards (per-token counts differ by rank): the kept count is round(k N) and the mask
    is the single process's."""
    group = Group.current()
    assert group is not None
    c = torch.randn(37, 5, generator=torch.Generator().manual_seed(4))
    g_sq = c.pow(2).sum(1)
    rows = slice(0, 12) if rank == 0 else slice(12, 37)
    chosen = select(c[rows], g_sq[rows], 0.13, group)
    whole = select(c, g_sq, 0.13)
    assert torch.equal(chosen.mask, whole.mask[rows])
    assert torch.equal(chosen.active, whole.active) and chosen.n_samples == 37
    assert torch.equal(chosen.batch_g_sq, g_sq)
    return {"kept": int(chosen.mask.sum()), "expected": n_kept(0.13, 37 * 5)}


def _memory_line(config: L3DConfig) -> str:
    """The memory estimate `build` prints: under a group, for the rank's shard of the batch."""
    lines: list[str] = []
    build(_mlp(), _mlp_data(), config, progress=False, log=lines.append)
    return lines[0]


def _other_model_per_rank(rank: int) -> str:
    """A model initialised differently on each rank (unseeded) is refused on every rank."""
    torch.manual_seed(100 + rank)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    try:
        l3d.run(model, _mlp_data(), _mlp_config("mlp_jacobian"), progress=False)
    except l3d.L3DError as err:
        return str(err)
    return "no error"


def _other_per_rank(rank: int) -> dict[str, str]:
    """Ranks that differ in what the sums of W0, factors and data could not see: the config
    (trained apart silently, or hung in a collective), the data's row order (trained on other
    batches), the number of tensors a glob matches (a fingerprint of another length aborted
    gloo), the order of batches given as an iterable (trained on other batches)."""
    config = _mlp_config("mlp_jacobian")
    data = _mlp_data()
    deeper = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = list(data[:40].split(10))  # a loader shuffled with another seed on each rank
    cases = {
        "lr": (config.replace(lr=0.02 + 0.03 * rank), data, _mlp()),
        "epochs": (config.replace(epochs=3 + rank), data, _mlp()),
        "rows": (config, data.flip(0) if rank else data, _mlp()),
        "params": (config.replace(params=["*.weight"]), data, deeper if rank else _mlp()),
        "batches": (config, batches[::-1] if rank else batches, _mlp()),
    }
    said = {}
    for name, (c, x, model) in cases.items():
        try:
            l3d.run(model, x, c, progress=False)
            said[name] = "no error"
        except l3d.L3DError as err:
            said[name] = str(err)
    return said


def _taken_folder(rank: int, folder: Path) -> str:
    """create_run on a folder that holds a run: rank 0 fails, and the other ranks stop with it
    instead of waiting for the folder."""
    try:
        runs.create_run(runs.RunSpec.create(RUN_SPEC), folder / "taken")
    except l3d.L3DError as err:
        return str(err)
    return "no error"


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = Path(folder)
        found = {
            "top_k": _global_top_k(rank),
            "refused": _other_model_per_rank(rank),
            "differ": _other_per_rank(rank),
            "taken": _taken_folder(rank, out),
            "memory": _memory_line(_mlp_config("mlp_jacobian")),
        }
        for name in MLP_CONFIGS:
            found[name] = _decompose(_mlp(), _mlp_data(), _mlp_config(name), name in SHARDED)
        found["mlp_sharded_one"] = _decompose(_mlp(), _mlp_data(), ONE_SUBNETWORK, True)
        found["lm"] = _decompose(_lm(out), _lm_data(), _lm_config())
        found["lm_empty_shard"] = _decompose(_lm(out), _lm_batches(), _lm_config())
        found["lm_sharded"] = _decompose(_lm(out), _lm_data(), _lm_config(), True)
        for name in RUNS:
            save_file(found[name].pop("tensors"), str(out / f"{name}-{rank}.safetensors"))
        for first, then in [(True, True), (True, False), (False, True)]:
            states = _states(first, then)
            name = f"resume-{first:d}{then:d}"
            if rank == 0:
                tensors, meta = flatten_state(states["middle"])
                save_file(tensors, str(out / f"{name}-middle.safetensors"))
                (out / f"{name}-middle.json").write_text(json.dumps(meta))
            save_file(states["final"], str(out / f"{name}-{rank}.safetensors"))
            found[name] = states["resampled"]
        (out / f"results-{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Both ranks' results of one 2-process spawn, and the single-process results."""
    pytest.importorskip("transformers")
    from l3d import hf
    from test_hf import tiny_config

    folder = tmp_path_factory.mktemp("distributed")
    taken = runs.create_run(runs.RunSpec.create(RUN_SPEC), folder / "taken")
    taken.append_metrics({"epoch": 0})  # a run with work in it
    hf.random_causal_lm(tiny_config(), folder / "lm", seed=0)
    mp.spawn(_worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {name: _decompose(_mlp(), _mlp_data(), _mlp_config(name)) for name in MLP_CONFIGS}
        single["mlp_sharded_one"] = _decompose(_mlp(), _mlp_data(), ONE_SUBNETWORK)
        single["lm"] = _decompose(_lm(folder), _lm_data(), _lm_config())
        single["lm_empty_shard"] = _decompose(_lm(folder), _lm_batches(), _lm_config())
        single["lm_sharded"] = single["lm"]
        config = _mlp_config("mlp_jacobian")
        single["memory"] = _memory_line(config)
        single["memory_shard"] = _memory_line(config.replace(batch_size=config.batch_size // WORLD))
        straight = _states(False, False)
        single["resume"] = {"final": straight["final"], "resampled": straight["resampled"]}
        middle = unflatten_state(
            load_file(str(folder / "resume-11-middle.safetensors")),
            json.loads((folder / "resume-11-middle.json").read_text()),
        )
        single["resume-from-sharded"] = _states(False, False, middle)["final"]
    finally:
        torch.set_num_threads(threads)
    ranks = []
    for rank in range(WORLD):
        found = json.loads((folder / f"results-{rank}.json").read_text())
        for name in RUNS:
            found[name]["tensors"] = load_file(str(folder / f"{name}-{rank}.safetensors"))
        for name in RESUMES:
            found[name] = {
                "final": load_file(str(folder / f"{name}-{rank}.safetensors")),
                "resampled": found[name],
            }
        ranks.append(found)
    return {"single": single, "ranks": ranks}


def test_global_top_k_keeps_exactly_round_k_n_over_the_ranks(results):
    kept = [r["top_k"]["kept"] for r in results["ranks"]]
    assert sum(kept) == results["ranks"][0]["top_k"]["expected"]
    assert all(k > 0 for k in kept)


@pytest.mark.parametrize("name", RUNS)
def test_two_ranks_equal_one_process_step_by_step(results, name):
    single = results["single"][name]
    for rank in results["ranks"]:
        mine = rank[name]
        assert len(mine["steps"]) == len(single["steps"])
        for step, (a, b) in enumerate(zip(mine["steps"], single["steps"])):
            assert a[2:] == b[2:], f"step {step}: top-k count / samples"
            torch.testing.assert_close(
                torch.tensor(a[:2]), torch.tensor(b[:2]), atol=ATOL, rtol=RTOL, msg=f"step {step}"
            )
        torch.testing.assert_close(
            torch.tensor(mine["history"]), torch.tensor(single["history"]), atol=ATOL, rtol=RTOL
        )
        for key, expected in single["tensors"].items():
            torch.testing.assert_close(
                mine["tensors"][key], expected, atol=ATOL, rtol=RTOL, msg=key
            )
    # The same step on every rank (summed gradients, same AdamW state, same projection): the
    # ranks' factors are bitwise equal.
    first, second = (rank[name]["tensors"] for rank in results["ranks"])
    assert all(torch.equal(first[key], second[key]) for key in first)
    # Every step's top-k keeps round(k N) of the whole batch's coefficients.
    config = (
        _lm_config()
        if name.startswith("lm")
        else ONE_SUBNETWORK
        if name == "mlp_sharded_one"
        else _mlp_config(name)
    )
    n_v, top_k = config.n_subnetworks, config.top_k
    assert all(s[2] == n_kept(top_k, s[3] * n_v) for s in single["steps"])


@pytest.mark.parametrize("name", RUNS)
def test_evaluation_and_impact_over_ranks_equal_one_process(results, name):
    single = results["single"][name]
    for rank in results["ranks"]:
        torch.testing.assert_close(
            torch.tensor(rank[name]["evaluation"]),
            torch.tensor(single["evaluation"]),
            atol=ATOL,
            rtol=RTOL,
        )
        assert rank[name]["held_out"][2] == single["held_out"][2]
        torch.testing.assert_close(
            torch.tensor(rank[name]["held_out"][:2]),
            torch.tensor(single["held_out"][:2]),
            atol=ATOL,
            rtol=RTOL,
        )


RESUMES = ["resume-11", "resume-10", "resume-01"]


def test_sharded_runs_resample_and_evaluate_held_out_as_one_process(results):
    """The sharded MLP run resamples (so the test covers edits of the shards) and logs held-out
    losses equal to the single process's."""
    single = results["single"]["mlp_sharded"]
    assert any(single["resampled"]), "the case must resample to test it"
    for rank in results["ranks"]:
        assert rank["mlp_sharded"]["resampled"] == single["resampled"]
        torch.testing.assert_close(
            torch.tensor(rank["mlp_sharded"]["heldout"]),
            torch.tensor(single["heldout"]),
            atol=ATOL,
            rtol=RTOL,
        )


@pytest.mark.parametrize("name", RESUMES)
def test_a_sharded_state_resumes_sharded_or_not_as_one_process(results, name):
    """Two epochs, the state through the checkpoint format, the rest resumed: sharded -> sharded,
    sharded -> unsharded, unsharded -> sharded (2 ranks) and sharded -> one process all end with
    the state (factors and AdamW moments) of one process's run straight through."""
    straight = results["single"]["resume"]
    assert any(straight["resampled"])
    finals = [rank[name]["final"] for rank in results["ranks"]]
    finals.append(results["single"]["resume-from-sharded"])
    for final in finals:
        assert final.keys() == straight["final"].keys()
        for key, expected in straight["final"].items():
            torch.testing.assert_close(final[key], expected, atol=ATOL, rtol=RTOL, msg=key)
    for rank in results["ranks"]:
        assert rank[name]["resampled"] == straight["resampled"]


def test_each_rank_estimates_the_memory_of_its_shard(results):
    single = results["single"]
    assert single["memory"] != single["memory_shard"]
    for rank in results["ranks"]:
        assert rank["memory"] == single["memory_shard"]


def test_ranks_with_different_models_are_refused(results):
    for rank in results["ranks"]:
        assert rank["refused"].startswith("rank 1 holds other decomposed weights"), rank["refused"]


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("lr", "rank 1 holds other .*config"),
        ("epochs", "rank 1 holds other .*config"),
        ("rows", "rank 1 holds other .*data"),
        ("params", "rank 1 holds other decomposed weights"),
        ("batches", "rank 1 holds other data batches"),
    ],
)
def test_ranks_with_other_configs_data_order_or_tensors_are_refused(results, case, said):
    import re

    for rank in results["ranks"]:
        assert re.match(said, rank["differ"][case]), rank["differ"][case]


def test_a_failure_of_rank_0_stops_the_other_ranks(results):
    lead, other = (rank["taken"] for rank in results["ranks"])
    assert "already holds a run" in lead
    assert other == "rank 0 failed (see its message); rank 1 stops too"


STOP_AT = 3
"""The step after which the two ranks of `_signalled_worker` receive their SIGTERM."""


def _signalled_worker(rank: int, port: int, folder: str) -> None:
    """SIGTERM reaching the ranks at different steps: rank 1 has it before its check after step
    STOP_AT and stops there; rank 0 just after that check, so it goes on into the next step's
    collective, which rank 1 never joins."""
    import signal

    from l3d.runs import execution

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)

    def after_step(self, on_step):
        steps = []

        def callback(result):
            self.training = True
            steps.append(result)
            if rank == 1 and len(steps) == STOP_AT:
                os.kill(os.getpid(), signal.SIGTERM)
            self.check()
            if rank == 0 and len(steps) == STOP_AT:
                os.kill(os.getpid(), signal.SIGTERM)

        return callback

    execution._Stop.after_step = after_step
    try:
        outcome = "finished"
        try:
            runs.execute(runs.RunDir(Path(folder)), progress=False, log=lambda m: None)
        except (runs.Interrupted, l3d.L3DError) as err:
            outcome = f"{type(err).__name__}: {err}"
        (Path(folder) / f"outcome-{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_ranks_signalled_at_different_steps_both_stop_as_signalled(tmp_path):
    """The rank signalled a step later waits in a collective for the rank that stopped, and
    lost contact when it exited: a SIGTERM to the job read as a failed rank (exit 1, not 143)."""
    spec = {**RUN_SPEC, "l3d": {**RUN_SPEC["l3d"], "epochs": 2, "batch_size": 16}}
    spec["run"] = {"checkpoint_seconds": 0, "progress": False}
    folder = tmp_path / "run"
    runs.create_run(runs.RunSpec.create(spec), folder)
    mp.spawn(_signalled_worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    outcomes = [(folder / f"outcome-{rank}.txt").read_text() for rank in range(WORLD)]
    assert outcomes == ["Interrupted: SIGTERM"] * WORLD, outcomes
