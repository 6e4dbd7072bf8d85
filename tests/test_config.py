"""Tests of lplb_plugin.config: defaults, round trips, YAML / JSON loading, every kind
of error (message names the dotted key and the bad value), validate_for."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from lplb_plugin.config import TOPOLOGIES, IPMConfig, LPLBConfig, PlacementConfig
from lplb_plugin.errors import LPLBConfigError, LPLBInputError

REPO = Path(__file__).resolve().parents[1]


def _err(d, match_all: list[str]) -> str:
    """Build from ``d``, expect LPLBConfigError, check every fragment is in it."""
    with pytest.raises(LPLBConfigError) as ei:
        LPLBConfig.from_dict(d)
    msg = str(ei.value)
    for frag in match_all:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------- defaults
def test_defaults():
    c = LPLBConfig()
    assert c.enabled is True and c.solver == "auto" and c.resolved_solver == "exact"
    assert c.warn_on_fallback is True
    p = c.placement
    assert (p.policy, p.topology, p.topology_shape) == ("topology", "cube", None)
    assert (p.redundant_per_rank, p.num_nodes, p.num_groups, p.workload) == (2, 1, 1, None)
    assert c.ipm == IPMConfig(max_iters=100, tol=1e-6)
    assert LPLBConfig.from_dict({}) == c
    assert LPLBConfig.from_dict({"placement": None, "ipm": None}) == c


def test_shorthand_true_false():
    assert LPLBConfig.from_dict(True) == LPLBConfig()
    off = LPLBConfig.from_dict(False)
    assert off.enabled is False and off.placement == PlacementConfig()


@pytest.mark.parametrize("solver,resolved", [("auto", "exact"), ("exact", "exact"), ("ipm", "ipm")])
def test_resolved_solver(solver, resolved):
    assert LPLBConfig.from_dict({"solver": solver}).resolved_solver == resolved


def test_frozen_and_hashable():
    c = LPLBConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.solver = "ipm"  # type: ignore[misc]
    assert hash(c) == hash(LPLBConfig())


# ---------------------------------------------------------------------- round trip
FULL = {
    "enabled": True,
    "solver": "ipm",
    "placement": {
        "policy": "topology",
        "topology": "torus",
        "topology_shape": [2, 4],
        "redundant_per_rank": 4,
        "num_nodes": 2,
        "num_groups": 4,
        "workload": "/data/load.json",
    },
    "ipm": {"max_iters": 50, "tol": 1e-4},
    "lp": {"scope": "global"},
    "stats": {"source": "router", "comm": "nvshmem", "check_consistency": False, "timeout_s": 30.0, "nvshmem_heap_mb": 16},
    "warn_on_fallback": False,
}


@pytest.mark.parametrize(
    "d",
    [
        {},
        FULL,
        {"placement": {"policy": "eplb", "num_nodes": 4, "num_groups": 8, "redundant_per_rank": 1}},
        {"placement": {"topology": "ring", "topology_shape": [4], "redundant_per_rank": 3}},
        {"placement": {"topology": "hypercube"}},
    ],
)
def test_round_trip(d):
    c = LPLBConfig.from_dict(d)
    plain = c.to_dict()
    assert LPLBConfig.from_dict(plain) == c
    # plain types only: survives JSON and YAML
    assert LPLBConfig.from_dict(json.loads(json.dumps(plain))) == c
    assert LPLBConfig.from_dict(yaml.safe_load(yaml.safe_dump(plain))) == c


def test_full_values_and_normalisation():
    c = LPLBConfig.from_dict(FULL)
    assert c.placement.topology_shape == (2, 4)  # stored as a tuple
    assert c.to_dict()["placement"]["topology_shape"] == [2, 4]  # dumped as a list
    assert c.to_dict() == FULL
    assert isinstance(LPLBConfig.from_dict({"ipm": {"tol": 1e-3}}).ipm.tol, float)


def test_int_accepted_for_float():
    # (0, 1e-2] holds no int, so check the coercion on the float spec directly
    from lplb_plugin.config import _Ctx, _Float

    v = _Float(0.0, 10.0).check(3, "k", _Ctx())
    assert v == 3.0 and isinstance(v, float)


def test_direct_construction_validates():
    with pytest.raises(LPLBConfigError, match=r"lplb\.solver: .*'fast'"):
        LPLBConfig(solver="fast")
    with pytest.raises(LPLBConfigError, match=r"lplb\.placement\.topology_shape"):
        PlacementConfig(topology="torus")
    with pytest.raises(LPLBConfigError, match=r"lplb\.ipm\.max_iters: .*0"):
        dataclasses.replace(LPLBConfig().ipm, max_iters=0)
    p = PlacementConfig(topology="torus", topology_shape=[2, 4])
    assert p.topology_shape == (2, 4)


# --------------------------------------------------------------------------- files
def test_yaml_block_file(tmp_path):
    f = tmp_path / "lplb.yaml"
    f.write_text("lplb:\n  solver: ipm\n  ipm:\n    tol: 1.0e-5\n")
    c = LPLBConfig.from_file(f)
    assert c.resolved_solver == "ipm" and c.ipm.tol == 1e-5
    assert LPLBConfig.from_yaml(f) == c


def test_yaml_whole_file_is_block(tmp_path):
    f = tmp_path / "lplb.yml"
    f.write_text("solver: exact\nplacement:\n  topology: hypercube\n")
    c = LPLBConfig.from_file(f)
    assert c.solver == "exact" and c.placement.group_size == 16


def test_full_megatron_yaml(tmp_path):
    (tmp_path / "loads").mkdir()
    f = tmp_path / "gpt_moe.yaml"
    f.write_text(
        """
language_model:
  num_layers: 4
  hidden_size: 1024
  num_moe_experts: 64
  moe_router_topk: 8
model_parallel:
  expert_model_parallel_size: 32
lr: 1.0e-4
lplb:
  enabled: true
  solver: auto
  placement:
    policy: topology
    topology: torus
    topology_shape: [4, 8]
    redundant_per_rank: 2
    workload: loads/v3.json
  ipm:
    max_iters: 20
    tol: 1.0e-6
  warn_on_fallback: false
"""
    )
    c = LPLBConfig.from_file(f)
    assert c.placement.topology_shape == (4, 8) and c.placement.group_size == 32
    assert c.warn_on_fallback is False and c.ipm.max_iters == 20
    # relative workload path resolves against the config file's directory
    assert c.placement.workload == os.path.join(str(tmp_path), "loads", "v3.json")
    assert LPLBConfig.from_dict(c.to_dict()) == c


def test_workload_paths(tmp_path):
    rel = LPLBConfig.from_dict({"placement": {"workload": "w.json"}})
    assert rel.placement.workload == "w.json"  # no base_dir: left as written
    based = LPLBConfig.from_dict({"placement": {"workload": "sub/../w.json"}}, base_dir="/cfg")
    assert based.placement.workload == os.path.normpath("/cfg/w.json")
    absolute = LPLBConfig.from_dict({"placement": {"workload": "/abs/w.json"}}, base_dir="/cfg")
    assert absolute.placement.workload == "/abs/w.json"
    assert LPLBConfig.from_dict({"placement": {"workload": tmp_path / "w.json"}}).placement.workload == str(
        tmp_path / "w.json"
    )


def test_ds_config_json(tmp_path):
    f = tmp_path / "ds_config.json"
    f.write_text(
        json.dumps(
            {
                "train_batch_size": 256,
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": 1},
                "lplb": {"solver": "exact", "placement": {"policy": "eplb", "num_nodes": 2, "num_groups": 4}},
            }
        )
    )
    c = LPLBConfig.from_file(f)
    assert c.placement.policy == "eplb" and c.placement.num_groups == 4
    assert LPLBConfig.from_json(f) == c


def test_json_shorthand_and_custom_key(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"lplb": false, "other": 1}')
    assert LPLBConfig.from_file(f).enabled is False
    f.write_text('{"moe_lb": {"solver": "ipm"}}')
    assert LPLBConfig.from_file(f, key="moe_lb").solver == "ipm"


@pytest.mark.parametrize("name", ["lplb_cube_ep32.yaml", "lplb_eplb_ep32.json"])
def test_shipped_configs_load(name):
    c = LPLBConfig.from_file(REPO / "configs" / name)
    assert c.enabled
    c.placement.validate_for(256, 32)
    if name.endswith(".yaml"):
        assert c.placement.topology == "cube"
        assert c.placement.physical_experts(256, 32) == 256 + 32 * c.placement.redundant_per_rank
    else:
        assert (c.placement.policy, c.placement.num_nodes, c.placement.num_groups) == ("eplb", 4, 8)
        assert c.placement.physical_experts(256, 32) == 288  # DeepSeek-V3's EPLB example


def test_bad_extension(tmp_path):
    f = tmp_path / "lplb.toml"
    f.write_text("solver = 'ipm'\n")
    with pytest.raises(LPLBConfigError, match=r"lplb\.toml: unsupported config file extension '\.toml'"):
        LPLBConfig.from_file(f)
    j = tmp_path / "c.json"
    j.write_text("{}")
    with pytest.raises(LPLBConfigError, match=r"'\.json'.*expected one of '\.yaml', '\.yml'"):
        LPLBConfig.from_yaml(j)
    with pytest.raises(LPLBConfigError, match=r"expected one of '\.json'"):
        LPLBConfig.from_json(tmp_path / "c.yaml")


def test_unparsable_files(tmp_path):
    j = tmp_path / "bad.json"
    j.write_text('{"lplb": {')
    with pytest.raises(LPLBConfigError, match="bad.json: cannot parse JSON"):
        LPLBConfig.from_file(j)
    y = tmp_path / "bad.yaml"
    y.write_text("lplb: [unclosed\n")
    with pytest.raises(LPLBConfigError, match="bad.yaml: cannot parse YAML"):
        LPLBConfig.from_file(y)


def test_file_errors_name_path_and_key(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("lplb:\n  placement:\n    topology: cubee\n")
    with pytest.raises(LPLBConfigError) as ei:
        LPLBConfig.from_file(f)
    msg = str(ei.value)
    assert str(f) in msg and "lplb.placement.topology" in msg and "'cubee'" in msg
    assert "did you mean 'cube'" in msg


def test_file_without_key_hint(tmp_path):
    f = tmp_path / "megatron.yaml"
    f.write_text("num_layers: 4\nhidden_size: 64\n")
    with pytest.raises(LPLBConfigError, match=r"(?s)lplb\.num_layers: unknown key.*no top-level 'lplb' key"):
        LPLBConfig.from_file(f)


def test_yaml_float_without_dot_hint(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lplb:\n  ipm:\n    tol: 1e-6\n")  # YAML 1.1: a string
    with pytest.raises(LPLBConfigError, match=r"lplb\.ipm\.tol: .*'1e-6' \(str\).*write 1\.0e-6"):
        LPLBConfig.from_file(f)


# -------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "d,key,allowed",
    [
        ({"placment": {}}, "lplb.placment", "did you mean 'lplb.placement'?"),
        ({"solvr": "ipm"}, "lplb.solvr", "did you mean 'lplb.solver'?"),
        ({"placement": {"topolgy": "ring"}}, "lplb.placement.topolgy", "did you mean 'lplb.placement.topology'?"),
        ({"ipm": {"max_iter": 5}}, "lplb.ipm.max_iter", "did you mean 'lplb.ipm.max_iters'?"),
    ],
)
def test_unknown_key_suggests(d, key, allowed):
    msg = _err(d, [f"{key}: unknown key", allowed, "valid keys"])
    assert "valid keys under" in msg


def test_unknown_key_lists_valid_keys_without_close_match():
    msg = _err({"zzz": 1}, ["lplb.zzz: unknown key", "enabled, solver, placement, ipm, lp, stats, warn_on_fallback"])
    assert "did you mean" not in msg


def test_non_string_key():
    _err({1: 2}, ["lplb: keys must be strings", "1 (int)"])


@pytest.mark.parametrize(
    "d,key,bad,allowed",
    [
        ({"enabled": 1}, "lplb.enabled", "1 (int)", "a bool"),
        ({"enabled": "true"}, "lplb.enabled", "'true' (str)", "a bool"),
        ({"warn_on_fallback": None}, "lplb.warn_on_fallback", "None", "a bool"),
        ({"solver": 3}, "lplb.solver", "3 (int)", "one of 'auto', 'exact', 'ipm'"),
        ({"ipm": {"max_iters": True}}, "lplb.ipm.max_iters", "True (bool)", "an int in [1, 1000]"),
        ({"ipm": {"max_iters": 10.0}}, "lplb.ipm.max_iters", "10.0 (float)", "an int"),
        ({"ipm": {"max_iters": "10"}}, "lplb.ipm.max_iters", "'10' (str)", "an int"),
        ({"ipm": {"tol": "0.001"}}, "lplb.ipm.tol", "'0.001' (str)", "a float in (0.0, 0.01]"),
        ({"ipm": {"tol": False}}, "lplb.ipm.tol", "False (bool)", "a float"),
        ({"placement": {"redundant_per_rank": True}}, "lplb.placement.redundant_per_rank", "True (bool)", "an int >= 1"),
        ({"placement": {"num_nodes": 2.5}}, "lplb.placement.num_nodes", "2.5 (float)", "an int >= 1"),
        ({"placement": {"topology_shape": 8}}, "lplb.placement.topology_shape", "8 (int)", "null or a list of ints"),
        ({"placement": {"topology_shape": "4x8"}}, "lplb.placement.topology_shape", "'4x8' (str)", "a list of ints"),
        ({"placement": {"topology": "ring", "topology_shape": [8.0]}}, "lplb.placement.topology_shape[0]", "8.0 (float)", "an int"),
        ({"placement": {"workload": 7}}, "lplb.placement.workload", "7 (int)", "null or a path"),
        ({"placement": {"workload": ""}}, "lplb.placement.workload", "''", "a path"),
        ({"placement": [1, 2]}, "lplb.placement", "[1, 2] (list)", "a mapping with keys policy, topology"),
        ({"ipm": 5}, "lplb.ipm", "5 (int)", "a mapping with keys max_iters, tol"),
    ],
)
def test_wrong_type(d, key, bad, allowed):
    _err(d, [f"{key}: expected", allowed, f"got {bad}"])


@pytest.mark.parametrize(
    "d,key,bad,allowed",
    [
        ({"ipm": {"max_iters": 0}}, "lplb.ipm.max_iters", "0", "an int in [1, 1000]"),
        ({"ipm": {"max_iters": 1001}}, "lplb.ipm.max_iters", "1001", "an int in [1, 1000]"),
        ({"ipm": {"tol": 0}}, "lplb.ipm.tol", "0", "a float in (0.0, 0.01]"),
        ({"ipm": {"tol": 0.0}}, "lplb.ipm.tol", "0.0", "a float in (0.0, 0.01]"),
        ({"ipm": {"tol": -1e-6}}, "lplb.ipm.tol", "-1e-06", "a float in (0.0, 0.01]"),
        ({"ipm": {"tol": 0.5}}, "lplb.ipm.tol", "0.5", "a float in (0.0, 0.01]"),
        ({"ipm": {"tol": float("nan")}}, "lplb.ipm.tol", "nan", "a float in (0.0, 0.01]"),
        ({"placement": {"redundant_per_rank": 0}}, "lplb.placement.redundant_per_rank", "0", "an int >= 1"),
        ({"placement": {"num_nodes": -1}}, "lplb.placement.num_nodes", "-1", "an int >= 1"),
        ({"placement": {"num_groups": 0}}, "lplb.placement.num_groups", "0", "an int >= 1"),
    ],
)
def test_out_of_range(d, key, bad, allowed):
    _err(d, [f"{key}: expected {allowed}", f"got {bad}"])


def test_edges_in_range():
    assert LPLBConfig.from_dict({"ipm": {"max_iters": 1, "tol": 1e-2}}).ipm == IPMConfig(1, 1e-2)
    assert LPLBConfig.from_dict({"ipm": {"max_iters": 1000}}).ipm.max_iters == 1000


@pytest.mark.parametrize(
    "d,key,bad,suggestion",
    [
        ({"solver": "fast"}, "lplb.solver", "'fast'", None),
        ({"solver": "IPM"}, "lplb.solver", "'IPM'", "'ipm'"),
        ({"placement": {"policy": "eplp"}}, "lplb.placement.policy", "'eplp'", "'eplb'"),
        ({"placement": {"topology": "cubee"}}, "lplb.placement.topology", "'cubee'", "'cube'"),
        ({"placement": {"topology": "Torus"}}, "lplb.placement.topology", "'Torus'", "'torus'"),
    ],
)
def test_bad_enum(d, key, bad, suggestion):
    field_options = {
        "lplb.solver": "one of 'auto', 'exact', 'ipm'",
        "lplb.placement.policy": "one of 'topology', 'eplb'",
        "lplb.placement.topology": "expected one of 'ring', 'cube', 'hypercube', 'torus'",
    }[key]
    msg = _err(d, [f"{key}: expected", field_options, f"got {bad}"])
    if suggestion:
        assert f"did you mean {suggestion}?" in msg
    else:
        assert "did you mean" not in msg


@pytest.mark.parametrize(
    "placement,key,fragments",
    [
        ({"topology": "torus"}, "lplb.placement.topology_shape", ["required for torus", "got None"]),
        ({"topology": "torus", "topology_shape": [8]}, "lplb.placement.topology_shape", ["[m, n]", "got [8]"]),
        ({"topology": "torus", "topology_shape": [1, 8]}, "lplb.placement.topology_shape", ["m >= 2 and n >= 2", "got [1, 8]"]),
        ({"topology": "torus", "topology_shape": [2, 2, 2]}, "lplb.placement.topology_shape", ["got [2, 2, 2]"]),
        ({"topology": "ring", "topology_shape": [4, 2]}, "lplb.placement.topology_shape", ["[n] with n >= 2", "got [4, 2]"]),
        ({"topology": "ring", "topology_shape": [1]}, "lplb.placement.topology_shape", ["n >= 2", "got [1]"]),
        ({"topology": "ring", "topology_shape": []}, "lplb.placement.topology_shape", ["got []"]),
        ({"topology": "cube", "topology_shape": [8]}, "lplb.placement.topology_shape", ["expected null", "'cube'", "got [8]"]),
        ({"topology": "hypercube", "topology_shape": [4, 4]}, "lplb.placement.topology_shape", ["expected null", "'hypercube'", "got [4, 4]"]),
        ({"topology": "cube", "redundant_per_rank": 3}, "lplb.placement.redundant_per_rank", ["multiple of 2", "'cube'", "got 3"]),
        ({"topology": "torus", "topology_shape": [2, 4], "redundant_per_rank": 1}, "lplb.placement.redundant_per_rank", ["multiple of 2", "'torus'", "got 1"]),
    ],
)
def test_bad_cross_field(placement, key, fragments):
    _err({"placement": placement}, [f"{key}:", "lplb.placement.topology="] + fragments)


def test_cross_field_rules_that_allow():
    # ring: any multiple of 1, default shape [8]
    assert LPLBConfig.from_dict({"placement": {"topology": "ring", "redundant_per_rank": 3}}).placement.group_size == 8
    # eplb: redundant_per_rank need not be a multiple of the (unused) topology's count
    p = LPLBConfig.from_dict({"placement": {"policy": "eplb", "redundant_per_rank": 1}}).placement
    assert p.redundant_per_rank == 1
    # multiples are fine
    assert PlacementConfig(topology="hypercube", redundant_per_rank=4).redundant_per_rank == 4


@pytest.mark.parametrize("block", [None, 5, "yes", [1, 2]])
def test_non_mapping_block(block):
    msg = _err(block, ["lplb: expected a mapping (the lplb block) or true/false", f"got {block!r}"])
    if block is None:
        assert "lplb: true" in msg


def test_non_mapping_block_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lplb: [1, 2]\n")
    with pytest.raises(LPLBConfigError, match=r"c\.yaml: lplb: expected a mapping.*got \[1, 2\] \(list\)"):
        LPLBConfig.from_file(f)
    f.write_text("lplb:\n")
    with pytest.raises(LPLBConfigError, match=r"got None"):
        LPLBConfig.from_file(f)


def test_source_prefix():
    with pytest.raises(LPLBConfigError, match=r"^moe\.lplb\.ipm\.tol: "):
        LPLBConfig.from_dict({"ipm": {"tol": 1}}, source="moe.lplb")


def test_all_problems_reported_together():
    msg = _err(
        {"solvr": "x", "enabled": "no", "ipm": {"tol": 2}, "placement": {"topology": "rign"}},
        ["4 problems in the lplb config", "lplb.solvr", "lplb.enabled", "lplb.ipm.tol", "lplb.placement.topology"],
    )
    assert msg.count("\n  - ") == 4


def test_every_error_is_a_value_error():
    with pytest.raises(ValueError):
        LPLBConfig.from_dict({"solver": "nope"})


# -------------------------------------------------------- validate_for / physical
@pytest.mark.parametrize(
    "placement,n_logical,ep,expected_phys",
    [
        ({"topology": "cube"}, 256, 32, 320),
        ({"topology": "cube", "redundant_per_rank": 4}, 256, 8, 288),
        ({"topology": "hypercube"}, 256, 16, 288),
        ({"topology": "ring"}, 64, 8, 80),
        ({"topology": "ring", "topology_shape": [4], "redundant_per_rank": 1}, 48, 12, 60),
        ({"topology": "torus", "topology_shape": [2, 4]}, 64, 16, 96),
        ({"policy": "eplb", "redundant_per_rank": 1, "num_nodes": 4, "num_groups": 8}, 256, 32, 288),
        ({"policy": "eplb", "num_nodes": 3, "num_groups": 8}, 60, 6, 72),  # 8 % 3: global policy
    ],
)
def test_physical_experts(placement, n_logical, ep, expected_phys):
    p = LPLBConfig.from_dict({"placement": placement}).placement
    p.validate_for(n_logical, ep)
    assert p.physical_experts(n_logical, ep) == expected_phys


@pytest.mark.parametrize(
    "placement,n_logical,ep,fragments",
    [
        ({}, 100, 32, ["n_logical=100", "ep_size=32"]),
        ({"topology": "cube"}, 48, 12, ["lplb.placement.topology='cube'", "multiple of 8", "ep_size=12"]),
        ({"topology": "hypercube"}, 256, 8, ["lplb.placement.topology='hypercube'", "multiple of 16", "ep_size=8"]),
        ({"topology": "ring", "topology_shape": [6], "redundant_per_rank": 1}, 64, 8,
         ["lplb.placement.topology='ring'", "topology_shape=[6]", "multiple of 6", "ep_size=8"]),
        ({"topology": "torus", "topology_shape": [4, 8]}, 256, 16, ["'torus'", "[4, 8]", "multiple of 32", "ep_size=16"]),
        ({"topology": "cube", "redundant_per_rank": 4}, 16, 8, ["lplb.placement.redundant_per_rank=4", "2 logical experts per rank"]),
        ({"policy": "eplb", "num_groups": 8}, 36, 4, ["lplb.placement.num_groups=8", "n_logical=36"]),
        ({"policy": "eplb", "num_nodes": 4, "num_groups": 8}, 72, 6, ["lplb.placement.num_nodes=4", "ep_size=6"]),
    ],
)
def test_validate_for_errors(placement, n_logical, ep, fragments):
    p = LPLBConfig.from_dict({"placement": placement}).placement
    for call in (p.validate_for, p.physical_experts):
        with pytest.raises(LPLBConfigError) as ei:
            call(n_logical, ep)
        for frag in fragments:
            assert frag in str(ei.value), (frag, str(ei.value))


@pytest.mark.parametrize("args", [(0, 8), (64, 0), (64, True), (64.0, 8), ("64", 8)])
def test_validate_for_bad_arguments(args):
    with pytest.raises(LPLBInputError):
        PlacementConfig().validate_for(*args)


def test_topology_table_matches_topology_module():
    topology = pytest.importorskip("lplb_plugin.topology")
    for name, shape in [("ring", None), ("ring", [4]), ("cube", None), ("hypercube", None), ("torus", [2, 4])]:
        r2o = topology.by_name(name, shape)
        p = PlacementConfig(topology=name, topology_shape=shape, redundant_per_rank=2)
        assert (p.group_size, p.n_redundant) == tuple(r2o.shape), name
        assert TOPOLOGIES[name][0] == r2o.shape[1]


def test_validate_for_agrees_with_layout_from_r2o():
    """A placement that validate_for accepts can be built by ExpertPlacement.from_r2o."""
    topology = pytest.importorskip("lplb_plugin.topology")
    layout = pytest.importorskip("lplb_plugin.layout")
    for placement, n_logical, ep in [
        ({"topology": "cube"}, 64, 16),
        ({"topology": "cube", "redundant_per_rank": 4}, 32, 8),
        ({"topology": "ring", "topology_shape": [4], "redundant_per_rank": 3}, 24, 8),
        ({"topology": "torus", "topology_shape": [2, 3]}, 12, 6),
    ]:
        p = LPLBConfig.from_dict({"placement": placement}).placement
        n_phys = p.physical_experts(n_logical, ep)
        pl = layout.ExpertPlacement.from_r2o(
            topology.by_name(p.topology, p.topology_shape), n_phys, n_logical, ep
        )
        assert pl.n_physical == n_phys


# ----------------------------------------------------------------------- describe / docs
def test_describe_and_docs_cover_every_key():
    rows = LPLBConfig.describe()
    keys = [r["key"] for r in rows]
    assert keys == [
        "lplb.enabled",
        "lplb.solver",
        "lplb.placement.policy",
        "lplb.placement.topology",
        "lplb.placement.topology_shape",
        "lplb.placement.redundant_per_rank",
        "lplb.placement.num_nodes",
        "lplb.placement.num_groups",
        "lplb.placement.workload",
        "lplb.ipm.max_iters",
        "lplb.ipm.tol",
        "lplb.lp.scope",
        "lplb.stats.source",
        "lplb.stats.comm",
        "lplb.stats.check_consistency",
        "lplb.stats.timeout_s",
        "lplb.stats.nvshmem_heap_mb",
        "lplb.warn_on_fallback",
    ]
    docs = REPO / "docs" / "config.md"
    if docs.exists():
        text = docs.read_text()
        for k in keys:
            assert f"`{k.removeprefix('lplb.')}`" in text, k


def test_docs_examples_load(tmp_path):
    """Every ```yaml / ```json block in docs/config.md holding an lplb block loads."""
    docs = REPO / "docs" / "config.md"
    if not docs.exists():
        pytest.skip("docs/config.md not written")
    import re

    blocks = re.findall(r"```(yaml|json)\n(.*?)```", docs.read_text(), flags=re.S)
    loaded = 0
    for lang, body in blocks:
        data = yaml.safe_load(body) if lang == "yaml" else json.loads(body)
        if isinstance(data, dict) and "lplb" in data:
            f = tmp_path / f"ex{loaded}.{lang}"
            f.write_text(body)
            LPLBConfig.from_file(f)
            loaded += 1
    assert loaded >= 3
