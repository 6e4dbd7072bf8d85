"""``lplb simulate``: the main job, its trace input, plot and errors; README/CI agree."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lplb_plugin.cli import main
from lplb_plugin.simulate import SimulationSpec, load_trace, run_simulation

ROOT = Path(__file__).resolve().parent.parent


def small_spec(**kw):
    base = dict(n_experts=64, topk=4, ep_size=8, tokens_per_rank=256, batches=3, num_nodes=2, num_groups=4)
    base.update(kw)
    return SimulationSpec(**base)


def _profile_file(tmp_path, rows):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"logical_count": rows}))
    return path


def test_simulation_ranks_policies_sensibly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    skew = (torch.rand(6, 64, generator=gen) ** 4 * 1000 + 1).tolist()
    prof = _profile_file(tmp_path, skew)
    spec = small_spec(place_on=str(prof), run_on=str(prof), policies=("none", "eplb", "lplb", "exact", "ipm", "eplb+exact"))
    result = run_simulation(spec, progress=False)
    by = {p["policy"]: p for p in result["policies"]}
    assert set(by) == {"none", "eplb", "lplb", "exact", "ipm", "eplb+exact"}
    for p in by.values():
        assert p["batches"] == 3 and p["max_over_mean_mean"] >= 1.0
    # same placement: the exact split is never worse than upstream's 5-iteration IPM
    # (up to token rounding), and replicas + an optimal split beat no balancing
    assert by["exact"]["max_over_mean_mean"] <= by["lplb"]["max_over_mean_mean"] + 0.01
    assert by["exact"]["max_over_mean_mean"] < by["none"]["max_over_mean_mean"]
    assert by["eplb+exact"]["max_over_mean_mean"] <= by["eplb"]["max_over_mean_mean"] + 0.01
    assert by["exact"]["optimal_batches"] == 3


def test_cli_default_shape_runs_and_prints_table(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    png = tmp_path / "r.png"
    rc = main(["simulate", "--batches", "2", "--tokens-per-rank", "128", "--no-progress", "--json", str(out_json), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| policy | placement | split | max/mean mean |" in text
    for name in ("none", "eplb", "lplb", "exact", "eplb+exact"):
        assert re.search(rf"^\| {re.escape(name)} \|", text, re.M)
    data = json.loads(out_json.read_text())
    assert data["spec"]["ep_size"] == 32 and data["spec"]["n_experts"] == 256
    assert png.stat().st_size > 10_000


def test_trace_replay(tmp_path, capsys):
    gen = torch.Generator().manual_seed(1)
    batches = (torch.rand(4, 64, generator=gen) * 50).round().tolist()
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"batches": batches}))
    rc = main(["simulate", "--trace", str(trace), "--place-on", "trace", "--n-experts", "64", "--ep-size", "8",
               "--num-nodes", "2", "--num-groups", "4", "--no-progress"])
    assert rc == 0
    assert "4 batches" in capsys.readouterr().out
    assert load_trace(trace).shape == (4, 64)


def test_trace_and_argument_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [[1, 2]]}))
    assert main(["simulate", "--trace", str(bad), "--no-progress"]) == 2
    assert "expected a JSON object with key 'batches'" in capsys.readouterr().err
    neg = tmp_path / "neg.json"
    neg.write_text(json.dumps({"batches": [[1, -2] + [0] * 14]}))
    assert main(["simulate", "--trace", str(neg), "--n-experts", "16", "--ep-size", "8", "--num-nodes", "2",
                 "--num-groups", "4", "--topk", "1", "--no-progress"]) == 2
    assert "finite and non-negative" in capsys.readouterr().err
    assert main(["simulate", "--n-experts", "100", "--no-progress"]) == 2
    assert "--n-experts=100 must be a multiple of --ep-size=32" in capsys.readouterr().err
    assert main(["simulate", "--place-on", "nope", "--no-progress"]) == 2
    assert "not a shipped profile" in capsys.readouterr().err
    assert main(["simulate", "--topology", "torus", "--no-progress"]) == 2
    assert "topology_shape" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--policies", "magic"])


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    first = [line for line in blocks[0].splitlines() if line.strip() and not line.startswith("#")]
    assert len(first) == 2, first
    main_cmd, test_cmd = first
    assert main_cmd.rstrip().endswith("lplb simulate")
    assert "pytest" in test_cmd
    # nothing but the title may come before the commands
    head = readme.split("```")[0]
    assert [line for line in head.splitlines() if line.strip() and not line.startswith("#")] == []
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci


def test_console_script_module_entry():
    r = subprocess.run([sys.executable, "-m", "lplb_plugin", "simulate", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--trace" in r.stdout
