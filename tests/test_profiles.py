"""Profiles: loading, resolution per layer, and clear errors for bad input."""

from __future__ import annotations

import pytest

from vdit_sparse.profile import LayerOverride, Profile, ProfileError, builtin_profiles, load_profile


def test_builtin_profiles_load():
    names = builtin_profiles()
    assert {"dense", "sliding-frames"} <= set(names)
    for name in names:
        assert load_profile(name).name == name


def test_yaml_path_and_profile_object_agree(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\nmethod: sliding_frames\nparams: {window_frames: 2}\n"
        "dense_warmup_steps: 3\ndense_layers: [0]\nlayers:\n  2: {method: dense, sensitivity: 0.5}\n"
    )
    from_yaml = load_profile(path)
    from_object = load_profile(
        Profile(
            name="mine",
            method="sliding_frames",
            params={"window_frames": 2},
            dense_warmup_steps=3,
            dense_layers=[0],
            layers={2: LayerOverride(method="dense", sensitivity=0.5)},
        )
    )
    for resolved in (from_yaml, from_object):
        assert resolved.dense_warmup_steps(50) == 3
        assert [g.method.name for g in resolved.layer_groups(0, 4)] == ["dense"]
        assert [g.method.name for g in resolved.layer_groups(2, 4)] == ["dense"]
        (group,) = resolved.layer_groups(1, 4)
        assert group.method.name == "sliding_frames" and group.params.window_frames == 2 and group.heads == (0, 1, 2, 3)


def test_layer_params_refine_profile_params():
    resolved = load_profile(
        {"method": "sliding_frames", "params": {"window_frames": 2, "block_size": 32},
         "layers": {1: {"params": {"window_frames": 0}}}}
    )
    (group,) = resolved.layer_groups(1, 2)
    assert (group.params.window_frames, group.params.block_size) == (0, 32)


def test_heads_of_a_layer_take_their_own_methods():
    resolved = load_profile({
        "method": "svg", "params": {"density": 0.2, "block_size": 32},
        "layers": {1: {"heads": {"0-1": {"method": "dense"}, 3: {"method": "skip"}, "2": {"params": {"density": 0.5}}}}},
    })
    groups = {g.heads: (g.method.name, getattr(g.params, "density", None)) for g in resolved.layer_groups(1, 6)}
    assert groups == {(4, 5): ("svg", 0.2), (0, 1): ("dense", None), (3,): ("skip", None), (2,): ("svg", 0.5)}
    assert [g.heads for g in resolved.layer_groups(0, 6)] == [(0, 1, 2, 3, 4, 5)]


@pytest.mark.parametrize(
    "heads, words",
    [
        ({"0-3": {"method": "dense"}, 2: {"method": "skip"}}, ["layers.1.heads.2", "names heads [2]", "layers.1.heads.0-3"]),
        ({"a": {"method": "dense"}}, ["layers.1.heads.a", "not a head index or range"]),
        ({"3-1": {"method": "dense"}}, ["layers.1.heads.3-1", "low <= high"]),
        ({"0": {"method": "nope"}}, ["layers.1.heads.0.method", "nope"]),
        ({"0": {"method": "sliding_frames", "params": {"block_size": 64}}}, ["block_size", "32", "64", "one launch"]),
    ],
    ids=["overlap", "not-a-range", "reversed", "unknown-method", "two-block-sizes"],
)
def test_bad_head_entries_are_refused_naming_the_field(heads, words):
    with pytest.raises(ProfileError) as error:
        load_profile({"method": "svg", "params": {"block_size": 32}, "layers": {1: {"heads": heads}}})
    for word in words:
        assert word in str(error.value)


def test_heads_beyond_the_model_are_refused():
    resolved = load_profile({"method": "svg", "layers": {1: {"heads": {"4-9": {"method": "dense"}}}}})
    with pytest.raises(ProfileError, match=r"layers.1.heads.4-9.*head 9.*6 attention heads"):
        resolved.check_model("cogvideox", num_layers=4, num_heads=6)


@pytest.mark.parametrize(
    "fraction, steps, expected", [(0.25, 50, 13), (0.25, 4, 1), (0.0, 8, 0), (1.0, 6, 6), (0.28, 25, 7), (0.06, 50, 3)]
)
def test_warmup_fraction_rounds_up(fraction, steps, expected):
    assert load_profile({"method": "dense", "dense_warmup_fraction": fraction}).dense_warmup_steps(steps) == expected


# (profile, words the error must contain)
MALFORMED = {
    "unknown-field": ({"method": "dense", "warmup": 2}, ["warmup", "allowed fields", "dense_warmup_steps"]),
    "unknown-method": ({"method": "sparse_magic"}, ["method", "sparse_magic", "allowed", "sliding_frames"]),
    "wrong-type": ({"method": "dense", "dense_warmup_steps": "two"}, ["dense_warmup_steps", "two"]),
    "negative-warmup": ({"method": "dense", "dense_warmup_steps": -1}, ["dense_warmup_steps", "-1", ">= 0"]),
    "fraction-range": ({"method": "dense", "dense_warmup_fraction": 1.5}, ["dense_warmup_fraction", "1.5", "[0, 1]"]),
    "both-warmups": ({"method": "dense", "dense_warmup_steps": 2, "dense_warmup_fraction": 0.2}, ["not both", "2", "0.2"]),
    "negative-dense-layer": ({"method": "dense", "dense_layers": [0, -3]}, ["dense_layers", "-3"]),
    "unknown-param": ({"method": "sliding_frames", "params": {"window": 1}}, ["params", "window", "allowed fields: block_size, backend, window_frames"]),
    "bad-param-value": ({"method": "sliding_frames", "params": {"window_frames": -2}}, ["window_frames", "-2", ">= 0"]),
    "bad-block-size": ({"method": "sliding_frames", "params": {"block_size": 48}}, ["block_size", "48", "64"]),
    "bad-backend": ({"method": "sliding_frames", "params": {"backend": "cuda"}}, ["backend", "cuda", "triton"]),
    "layer-unknown-method": ({"method": "dense", "layers": {3: {"method": "nope"}}}, ["layers.3.method", "nope"]),
    "bad-sensitivity": ({"method": "dense", "layers": {1: {"sensitivity": -0.1}}}, ["layers.1.sensitivity", "-0.1"]),
    "zero-heads": ({"method": "dense", "model": {"num_heads": 0}}, ["model.num_heads", "0"]),
    "not-a-mapping": (["dense"], ["built-in name", "YAML path", "list"]),
    "layers-as-list": ({"method": "dense", "layers": [1, 2]}, ["field 'layers'", "expected a mapping", "[1, 2]"]),
    "params-as-list": ({"method": "sliding_frames", "params": [1]}, ["field 'params'", "expected a mapping", "[1]"]),
    "dense-layers-as-mapping": ({"method": "dense", "dense_layers": {0: 1}}, ["field 'dense_layers'", "expected a list"]),
    "layer-as-list": ({"method": "dense", "layers": {1: [1]}}, ["field 'layers.1'", "expected a mapping"]),
    "layer-params-as-list": ({"method": "dense", "layers": {1: {"params": [1]}}}, ["field 'layers.1.params'"]),
    "huge-window": ({"method": "sliding_frames", "params": {"window_frames": 10**20}},
                    ["window_frames", "100000000000000000000", "at most 2147483647"]),
    "huge-layer-index": ({"method": "dense", "dense_layers": [2**40]}, ["dense_layers[0]", "too large"]),
    "interpolation": ({"method": "dense", "description": "${oc.env:HOME}"}, ["field 'description'", "${oc.env:HOME}",
                                                                              "interpolation", "plain data"]),
    "interpolation-in-params": ({"method": "sliding_frames", "params": {"window_frames": "${oc.env:W}"}},
                                ["params.window_frames", "interpolation"]),
    "empty": ({}, ["is empty", "method"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_profile_is_refused_with_a_clear_message(case):
    raw, words = MALFORMED[case]
    with pytest.raises(ProfileError) as error:
        load_profile(raw)
    message = str(error.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_unknown_name_lists_builtins():
    with pytest.raises(ProfileError, match="unknown profile 'fastest'.*sliding-frames"):
        load_profile("fastest")


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: [dense\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(path)


@pytest.mark.parametrize(
    "model, words",
    [
        ({"num_layers": 42}, ["42 attention layers", "has 8"]),
        ({"num_heads": 48}, ["48 attention heads", "has 4"]),
        ({"family": "hunyuan-video"}, ["hunyuan-video", "cogvideox"]),
    ],
)
def test_profile_for_another_model_is_refused(model, words):
    resolved = load_profile({"method": "dense", "model": model})
    with pytest.raises(ProfileError) as error:
        resolved.check_model("cogvideox", num_layers=8, num_heads=4)
    for word in words:
        assert word in str(error.value)


def test_layer_index_beyond_model_is_refused():
    resolved = load_profile({"method": "dense", "dense_layers": [9]})
    with pytest.raises(ProfileError, match=r"\[9\].*8 attention layers"):
        resolved.check_model("cogvideox", num_layers=8, num_heads=4)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- dense\n- sliding_frames\n")
    with pytest.raises(ProfileError, match="expected a mapping of fields, got list"):
        load_profile(path)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", ["is empty"]),
        (b"# only a comment\n", ["is empty"]),
        (bytes(range(256)), ["not a UTF-8 text file"]),
        (b"name: ${oc.env:HOME}\nmethod: dense\n", ["field 'name'", "interpolation"]),
        (b"method: sliding_frames\nparams: {window_frames: 100000000000000000000}\n", ["window_frames", "too large"]),
        (b"method: dense\nlayers: [1, 2]\n", ["field 'layers'", "expected a mapping"]),
    ],
    ids=["empty", "comment-only", "binary", "interpolation", "huge-int", "layers-as-list"],
)
def test_malformed_yaml_file_is_refused_with_a_clear_message(tmp_path, monkeypatch, content, words):
    monkeypatch.setenv("HOME", "/secret/home")
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    for word in words:
        assert word in str(error.value)
    assert "/secret/home" not in str(error.value)
