"""``vllm bench serve --save-result --save-detailed`` JSON: good files, summaries without details, bad input."""

import json
import math

import numpy as np
import pytest

from traces.bench_json import read_bench_result
from traces.errors import TraceFormatError


def _result(n=5, detailed=True, latencies=True):
    rng = np.random.default_rng(0)
    ttfts = rng.uniform(0.05, 0.3, n).round(6).tolist()
    outs = [16, 32, 1, 64, 8][:n]
    itls = [rng.uniform(0.01, 0.03, max(o - 1, 0)).round(6).tolist() for o in outs]
    d = {"date": "20260425-184718", "backend": "vllm", "model_id": "meta-llama/Llama-3.1-8B",
         "tokenizer_id": "meta-llama/Llama-3.1-8B", "num_prompts": n, "request_rate": "inf", "burstiness": 1.0,
         "max_concurrency": None, "gpu": "rtxpro6000",  # a --metadata pair
         "duration": 3.2, "completed": n, "failed": 0, "total_input_tokens": 100 * n,
         "total_output_tokens": sum(outs), "request_throughput": n / 3.2, "mean_ttft_ms": 1e3 * np.mean(ttfts),
         "median_ttft_ms": 1e3 * float(np.median(ttfts)), "p99_ttft_ms": 1e3 * max(ttfts)}
    if detailed:
        d.update({"input_lens": [100] * n, "output_lens": outs, "ttfts": ttfts, "itls": itls,
                  "start_times": [0.1 * i for i in range(n)], "generated_texts": ["x"] * n, "errors": [""] * n})
        if latencies:
            d["latencies"] = [t + sum(i) for t, i in zip(ttfts, itls, strict=True)]
    return d


def _write(tmp_path, d):
    p = tmp_path / "result.json"
    p.write_text(json.dumps(d, indent=2))
    return p


@pytest.mark.parametrize("latencies", [True, False])
def test_detailed_result_per_request_metrics(tmp_path, latencies):
    d = _result(latencies=latencies)
    res = read_bench_result(_write(tmp_path, d))
    assert res.detailed and len(res.requests) == 5
    assert math.isinf(res.metadata["request_rate"]) and res.metadata["gpu"] == "rtxpro6000"
    assert res.aggregates["completed"] == 5 and res.aggregates["mean_ttft_ms"] == pytest.approx(d["mean_ttft_ms"])
    r = res.requests
    assert r["ttft_s"].tolist() == d["ttfts"]
    k = 1
    assert r["tpot_s"].iloc[k] == pytest.approx(np.mean(d["itls"][k]))
    assert r["tpot_s"].iloc[2] == 0.0  # one output token: no TPOT
    assert r["e2e_s"].iloc[3] == pytest.approx(d["ttfts"][3] + sum(d["itls"][3]))
    assert r["success"].all() and r["num_itls"].tolist() == [15, 31, 0, 63, 7]
    assert res.itls[0] == d["itls"][0]


def test_summary_only_result_has_no_requests(tmp_path):
    res = read_bench_result(_write(tmp_path, _result(detailed=False)))
    assert res.requests is None and not res.detailed and res.aggregates["duration"] == 3.2


def test_failed_request_kept_and_flagged(tmp_path):
    d = _result()
    d["errors"][1], d["ttfts"][1], d["output_lens"][1], d["itls"][1] = "Bad Request", 0.0, 0, []
    d["latencies"][1] = 0.0
    r = read_bench_result(_write(tmp_path, d)).requests
    assert r["success"].tolist() == [True, False, True, True, True]


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["ttfts"].pop(), "field ttfts: has 4 entries but input_lens has 5"),
    (lambda d: d["ttfts"].__setitem__(2, -1.0), "field ttfts[2]"),
    (lambda d: d["itls"].__setitem__(3, [0.01, "x"]), "field itls[3]"),
    (lambda d: d["output_lens"].__setitem__(0, 1.5), "field output_lens[0]"),
    (lambda d: d.__setitem__("request_rate", "fast"), "field request_rate"),
])
def test_malformed_names_file_line_field(tmp_path, mutate, needle):
    d = _result()
    mutate(d)
    p = _write(tmp_path, d)
    with pytest.raises(TraceFormatError) as e:
        read_bench_result(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg
    line = int(msg.split(f"{p}:")[1].split(":")[0])
    key = needle.split("field ")[1].split("[")[0].split(":")[0]
    assert f'"{key}"' in p.read_text().splitlines()[line - 1]


def test_skip_bad_counts_dropped_requests(tmp_path):
    d = _result()
    d["ttfts"][2] = "n/a"
    res = read_bench_result(_write(tmp_path, d), skip_bad=True)
    assert res.skipped == 1 and len(res.requests) == 4


def test_invalid_json(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"duration": 1.0,\n "completed": }')
    with pytest.raises(TraceFormatError, match=r"r.json:2: invalid JSON"):
        read_bench_result(p)
