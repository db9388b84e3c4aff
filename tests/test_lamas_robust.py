"""Every seed reproduces LAMaS's claim, not only the mean (issue 18).

Under the default ``"robust"`` protocol (``agents.lamas.PROTOCOLS``) each seed's LAMaS controller must cut the
critical path against the same seed's MaAS by at least the paper's smallest reduction (38 %, GSM8K), and lose
no more than 1 point of score. HumanEval is the fastest task to check (33 train / 131 test queries), but one
test query is worth 0.76 points there and the paired score gap of one seed moves by about 1.5 points with the
LLM outcomes of one test run alone; even averaged over the default 8 test runs (avg@K) a seed's gap keeps a
standard error of about 0.5 point, so the score bound is checked on the seeds' mean, the CP bound on every
seed. The paper's own protocol stays selectable and gives different controllers."""

import pytest
import torch

from agents.experiment import run_experiment


@pytest.mark.slow
def test_every_seed_cuts_the_critical_path_at_no_score_loss():
    torch.set_num_threads(1)
    out = run_experiment("humaneval", [0, 1, 2], ["lamas", "maas"]).to_json()
    assert out["protocol"] == "robust" and len(out["per_seed"]) == 3
    for s in out["per_seed"]:
        assert s["savings"]["cp_tokens_reduction_pct"] >= 38.0, s
    assert out["savings"]["score_gap_points"] >= -1.0, out["savings"]


def test_the_paper_protocol_stays_selectable():
    torch.set_num_threads(1)
    paper = run_experiment("humaneval", [0], ["lamas"], epochs=1, protocol="paper").to_json()
    robust = run_experiment("humaneval", [0], ["lamas"], epochs=1).to_json()
    assert paper["protocol"] == "paper" and robust["protocol"] == "robust"
    assert paper["methods"]["lamas"] != robust["methods"]["lamas"]
    with pytest.raises(ValueError, match="protocol must be one of"):
        run_experiment("humaneval", [0], ["lamas"], epochs=1, protocol="mine")
