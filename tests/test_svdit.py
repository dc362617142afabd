"""Sparse-vDiT: the static per-head modes, and the offline search that chooses them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from vdit_sparse import accelerate_pipeline
from vdit_sparse.context import AttentionCall, RunStats, StateStore, StepContext
from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.kernels.reference import expand_block_mask, indices_to_block_mask
from vdit_sparse.methods.svdit import SVDiTMethod, format_column_ranges, mode_plan, parse_column_ranges
from vdit_sparse.profile import ProfileError, load_profile
from vdit_sparse.routing import HeadGroup, LayerRouting
from vdit_sparse.search import SearchSettings, candidate_errors, choose_modes
from vdit_sparse.synthetic import planted_qkv, planted_stripe_columns

LAYOUT = TokenLayout(LatentGrid(5, 8, 8), 16, "prefix")
BLOCK = 16


# -- the modes -----------------------------------------------------------------------


def svdit(**params) -> SVDiTMethod:
    return SVDiTMethod(SVDiTMethod.parse_params({"block_size": BLOCK, **params}))


MIXED = {  # head -> params: all five modes in one layer
    0: {"mode": "diagonal", "density": 0.1},
    1: {"mode": "multi_diagonal", "density": 0.2},
    2: {"mode": "vertical_stripe", "columns": ["0-15", "100-120"]},
    3: {"mode": "skip"},
    4: {"mode": "dense"},
    5: {"mode": "multi_diagonal", "density": 0.2},
}


def token_mask(params: dict) -> torch.Tensor:
    """The (S, S) token mask a head's mode computes, from its block mask (in the head's own token order)."""
    columns = None
    if params["mode"] == "vertical_stripe":
        offsets = torch.cat([torch.arange(a, b + 1) for a, b in parse_column_ranges(params["columns"])])
        columns = LAYOUT.video_start + offsets
    plan = mode_plan(LAYOUT, params["mode"], BLOCK, BLOCK, "cpu", density=params.get("density", 1.0), columns=columns)
    blocks = indices_to_block_mask(plan.kv_block_indices, plan.kv_block_counts, math.ceil(LAYOUT.seq_len / BLOCK))[0, 0]
    mask = expand_block_mask(blocks, BLOCK, BLOCK, LAYOUT.seq_len)
    if plan.query_rows is not None:  # the mask holds in the permuted order: map it back to tokens
        order = plan.query_rows[0, 0].long()
        back = torch.empty_like(mask)
        back[order[:, None], order[None, :]] = mask
        mask = back
    return mask


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_five_modes_in_one_layer_run_in_one_launch_and_match_each_head_alone(backend, monkeypatch):
    from vdit_sparse.kernels import block_sparse_attention as kernel_module
    from vdit_sparse.kernels._triton_runtime import interpreter_active

    if backend == "triton" and not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    launches = []
    real = kernel_module.kernel_for
    monkeypatch.setattr(kernel_module, "kernel_for", lambda f, d: launches.append(f) or real(f, d))
    layer = LayerRouting(0, [HeadGroup(svdit(backend=backend, **params), (head,)) for head, params in MIXED.items()])
    q, k, v = planted_qkv(LAYOUT, ["spatial", "temporal"] * 3, batch=2, head_dim=32, noise=0.5, seed=1)
    call = AttentionCall(0, StepContext(3, 4, 1.0, 0, LAYOUT), None, RunStats())
    out = layer.attend(q, k, v, call, StateStore())
    if backend == "triton":
        assert len(launches) == 1
    for head, params in MIXED.items():
        if params["mode"] == "skip":
            assert out[:, head].abs().max() == 0
            continue
        expected = F.scaled_dot_product_attention(q[:, head], k[:, head], v[:, head], attn_mask=token_mask(params))
        torch.testing.assert_close(out[:, head], expected, rtol=0, atol=1e-4, msg=f"head {head} {params}")
    for head in (0, 1, 2):  # the sparse modes really are sparse
        assert token_mask(MIXED[head]).float().mean() < 0.6


def test_a_band_of_density_one_is_dense():
    q, k, v = planted_qkv(LAYOUT, ["dense"] * 2, head_dim=32, seed=2)
    expected = F.scaled_dot_product_attention(q, k, v)
    for mode in ("diagonal", "multi_diagonal"):
        layer = LayerRouting(0, [HeadGroup(svdit(mode=mode, density=1.0), (0, 1))])
        call = AttentionCall(0, StepContext(3, 4, 1.0, 0, LAYOUT), None, RunStats())
        torch.testing.assert_close(layer.attend(q, k, v, call, StateStore()), expected, rtol=0, atol=1e-5)


def test_mode_parameters_are_checked_by_the_profile_loader():
    def load(params):
        return load_profile({"method": "svdit", "params": params})

    with pytest.raises(ProfileError, match="mode"):
        load({"mode": "diagonals"})
    with pytest.raises(ProfileError, match="columns"):
        load({"mode": "vertical_stripe"})
    with pytest.raises(ProfileError, match="'9-3'"):
        load({"mode": "vertical_stripe", "columns": ["9-3"]})
    with pytest.raises(ProfileError, match="density"):
        load({"mode": "diagonal", "density": 0})
    assert parse_column_ranges(["0-3", "7"]) == [(0, 3), (7, 7)]
    assert format_column_ranges(torch.tensor([7, 0, 1, 2, 3, 9, 10])) == ["0-3", "7", "9-10"]


def test_stripe_columns_past_the_video_are_refused_when_the_layout_is_known():
    layer = LayerRouting(0, [HeadGroup(svdit(mode="vertical_stripe", columns=["0-5000"]), tuple(range(2)))])
    q = torch.zeros(1, 2, LAYOUT.seq_len, 32)
    call = AttentionCall(0, StepContext(3, 4, 1.0, 0, LAYOUT), None, RunStats())
    with pytest.raises(ValueError, match="reach video token 5000, but this call has 320"):
        layer.attend(q, q, q, call, StateStore())


# -- the search's choice on planted heads ------------------------------------------------


def test_the_search_picks_the_planted_mode_for_planted_heads():
    planted = ["diagonal", "multi_diagonal", "vertical_stripe", "dense", "skip"] * 12  # 60 heads
    kinds = [kind if kind != "skip" else "spatial" for kind in planted]
    q, k, v = planted_qkv(LAYOUT, kinds, batch=2, head_dim=32, noise=0.1, seed=3)
    skipped = torch.tensor([kind == "skip" for kind in planted])
    v[:, skipped] *= 1e-3  # a head whose output is negligible: skipping it costs nothing
    settings = SearchSettings()
    errors, costs, _ = candidate_errors(q, k, v, LAYOUT, settings, BLOCK, BLOCK)
    candidates = settings.candidates()
    chosen = [candidates[i][0] for i in choose_modes(errors, costs, settings)]
    hits = sum(c == p for c, p in zip(chosen, planted))
    assert hits / len(planted) >= 0.98, list(zip(planted, chosen))


def test_stripe_candidates_take_the_planted_columns():
    q, k, v = planted_qkv(LAYOUT, ["vertical_stripe"] * 4, head_dim=32, noise=0.1, seed=4)
    settings = SearchSettings(modes=("vertical_stripe",), densities=(0.25,))
    _, _, mass = candidate_errors(q, k, v, LAYOUT, settings, BLOCK, BLOCK)
    planted = planted_stripe_columns(LAYOUT, 4, seed=4)  # (H, 4) sequence indices
    top = mass.topk(4, dim=-1).indices
    for head in range(4):
        assert set((planted[head] // BLOCK).tolist()) <= set(top[head].tolist())


# -- the search on a pipeline ----------------------------------------------------------


def _without_run_facts(profile: dict) -> dict:
    """A searched profile without what differs between two runs of the same search (date, time, memory)."""
    provenance = {key: value for key, value in profile["provenance"].items()
                  if key not in ("date", "seconds", "host_max_rss_mib", "device_max_allocated_mib")}
    return {**profile, "provenance": provenance}


def test_search_command_on_the_reference_model_in_ci_time(tmp_path, capsys):
    """``vdit-sparse search`` on the trained reference model: a profile that loads, runs sparse, and shows in inspect."""
    import time

    from vdit_sparse.cli import main
    from vdit_sparse.reference_model import REFERENCE_CALL_ARGS, build_reference_pipeline

    out = tmp_path / "searched.yaml"
    start = time.perf_counter()
    assert main(["search", "--out", str(out), "--prompt", "red circle moving right", "--steps", "10",
                 "--budget", "0.5"]) == 0
    seconds = time.perf_counter() - start
    print(f"search on the reference model: {seconds:.1f} s")
    assert seconds < 120  # the CI bound; about 25 s on a 2-core machine
    profile = yaml.safe_load(out.read_text())
    provenance = profile["provenance"]
    assert provenance["model"] == "embedded:reference" and provenance["prompts"] == ["red circle moving right"]
    assert provenance["call_args"]["num_inference_steps"] == 10 and provenance["host_max_rss_mib"] > 0
    assert provenance["sparse_step_computed_fraction"] <= 0.5 + 1e-9
    assert set(profile["layers"]) == set(range(6)) and all("sensitivity" in e for e in profile["layers"].values())
    # Another budget refits from the record, without running the pipeline.
    from vdit_sparse import cli

    real_load = cli._load_pipeline
    loaded = []
    cli._load_pipeline = lambda *a, **k: loaded.append(a) or real_load(*a, **k)
    try:
        refit = time.perf_counter()
        assert main(["search", "--out", str(out), "--prompt", "red circle moving right", "--steps", "10",
                     "--budget", "0.35"]) == 0
        refit = time.perf_counter() - refit
    finally:
        cli._load_pipeline = real_load
    tighter = yaml.safe_load(out.read_text())["provenance"]
    assert tighter["sparse_step_computed_fraction"] <= 0.35 + 1e-9 < provenance["sparse_step_computed_fraction"]
    assert tighter["seconds"] == provenance["seconds"]  # no new search time was spent
    assert refit < seconds / 2 and len(loaded) == 1

    pipe = build_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = {**REFERENCE_CALL_ARGS, "num_inference_steps": 5}
    with accelerate_pipeline(pipe, out) as handle:
        pipe(prompt="red circle moving right", generator=torch.Generator().manual_seed(0), output_type="latent", **call)
        assert handle.summary()["computed_fraction"] < 0.8
    capsys.readouterr()
    assert main(["inspect", str(out), "--png", str(tmp_path / "map.png")]) == 0
    shown = capsys.readouterr().out
    assert "sensitivity" in shown and "layer   5" in shown
    assert (tmp_path / "map.png").stat().st_size > 0 and (tmp_path / "map-sensitivity.png").stat().st_size > 0


def test_an_interrupted_search_resumes_from_its_record(tmp_path, monkeypatch):
    from vdit_sparse.reference_model import REFERENCE_CALL_ARGS, build_reference_pipeline
    from vdit_sparse.search import search_profile

    pipe = build_reference_pipeline()
    prompts, call = ["red circle moving right", "blue square moving left"], {**REFERENCE_CALL_ARGS, "num_inference_steps": 4}
    settings = SearchSettings(budget=0.6)
    whole = search_profile(pipe, prompts, [0], call, settings, out=tmp_path / "whole.yaml", progress=False)

    calls, real_call = [], type(pipe).__call__

    def interrupted(self, *args, **kwargs):
        calls.append(kwargs["prompt"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search_profile(pipe, prompts, [0], call, settings, out=tmp_path / "again.yaml", progress=False)
    assert (tmp_path / "again.yaml.record.pt").exists()
    calls.clear()
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: calls.append(k["prompt"]) or real_call(self, *a, **k))
    resumed = search_profile(pipe, prompts, [0], call, settings, out=tmp_path / "again.yaml", progress=False)
    assert calls[0] == prompts[1]  # the first prompt was not searched again (the later call captures sensitivity inputs)
    assert _without_run_facts(resumed) == _without_run_facts(whole)


@pytest.mark.parametrize("extra, words", [
    (["--out", "profile.txt"], "ending in .yaml"),
    (["--out", "p.yaml", "--budget", "0"], "budget must be in (0, 1]"),
    (["--out", "p.yaml", "--modes", "diagonals"], "unknown modes"),
    (["--out", "p.yaml", "--densities", "1.5"], "densities must be in (0, 1]"),
])
def test_search_arguments_are_checked_before_any_work(tmp_path, capsys, monkeypatch, extra, words):
    from vdit_sparse import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a, **k: pytest.fail("loaded a model before checking"))
    assert cli.main(["search", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err


def test_search_on_hunyuan_video_with_true_cfg(tmp_path):
    """Padded text keys, two transformer calls a step: the search runs, and its profile applies."""
    from vdit_sparse.embedded import DEMO_CALL_ARGS, build_embedded_pipeline
    from vdit_sparse.search import search_profile

    pipe = build_embedded_pipeline("hunyuan-video", seed=0)
    call = {**DEMO_CALL_ARGS["hunyuan-video"], "true_cfg_scale": 2.0, "negative_prompt": "blurry"}
    profile = search_profile(pipe, ["a red ball moves right"], [0], call, SearchSettings(warmup_fraction=0.25),
                             out=tmp_path / "hunyuan.yaml", progress=False)
    assert profile["model"]["family"] == "hunyuan-video" and set(profile["layers"]) == {0, 1, 2, 3}
    sparse = [layer for layer, entry in profile["layers"].items()
              if any(head["params"]["mode"] != "dense" for head in entry["heads"].values())]
    assert sparse and all(profile["layers"][layer]["sensitivity"] > 0 for layer in sparse)
    with accelerate_pipeline(pipe, tmp_path / "hunyuan.yaml") as handle:
        pipe(prompt="a red ball moves right", generator=torch.Generator().manual_seed(0), output_type="latent", **call)
        assert handle.summary()["calls"]
