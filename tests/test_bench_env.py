"""``maslat bench env``: both background modes measured in one run, their ratios, one JSON object last."""

import json

from maslat.cli import main


def _bench(capsys, *args: str) -> dict:
    assert main(["bench", "env", "--episodes", "12", "--gym-episodes", "4", "--seed", "1", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_env_reports_exact_tape_and_their_ratios(capsys):
    d = _bench(capsys)
    t = d["tape"]
    for k in ("episodes_per_s", "episodes_per_s_cpu", "gym_episodes_per_s", "gym_episodes_per_s_cpu"):
        assert d[k] > 0 and t[k] > 0
        assert d["tape_over_exact"][k] == t[k] / d[k]
    assert d["background"] == "both" and d["tape_build_s"] > 0
    assert d["gym_background_requests_per_episode"] > 0      # the exact loop simulated its background
    assert t["rollout_llm_calls_per_episode"] > 1 and t["gym_episodes"] == 4
    only = _bench(capsys, "--background", "tape")
    assert "tape_over_exact" not in only and only["gym_background_requests_per_episode"] is None
