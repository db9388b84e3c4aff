"""The calibration's report (JSON-ready and human-readable) and the calibrated profile's provenance.

``report`` says, for the runs together: settings, KV capacity, coefficients with units and residuals, the
refinement, the overheads with their source; and per run (``"runs"``): how it was timed (engine or client), its
reconstruction and its replay errors. ``profile_provenance`` gives the profile's description, the source of
every number and ``derived_from`` (the files' hashes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import sim

from .stepfit import ENGINE_SUM_KINDS, RunFit, StepFit

__all__ = ["OVERHEAD_SOURCE", "format_report", "profile_provenance", "report"]

OVERHEAD_SOURCE = ("not identifiable from the run format (engine-side timestamps only; arrival_time is on another "
                   "clock): BLIS priors alpha0 15.6 ms, alpha1 0.78 ms, alpha2 46 us/token "
                   "(docs/latency_physics.md#4-step-time-model)")


def _residuals(pred: np.ndarray, y: np.ndarray) -> dict:
    if len(y) == 0:
        return {"rows": 0}
    rel = (pred - y) / y
    return {"rows": int(len(y)), "median_abs_rel_pct": float(100 * np.median(np.abs(rel))),
            "p90_abs_rel_pct": float(100 * np.percentile(np.abs(rel), 90)),
            "bias_pct": float(100 * (pred.sum() - y.sum()) / y.sum())}


def _nnls_report(fit: StepFit, coef_final: dict[str, float]) -> dict:
    free, fam = set(fit.free), fit.family
    coefs = {}
    for n in fam.names:
        status = "fitted (NNLS, refined)" if n in free else "held"
        coefs[n] = {"value": coef_final[n], "nnls": fit.coefficients[n], "unit": fam.units[n],
                    "status": status, **({"why": fam.held[n]} if n in fam.held and n not in free else {})}
    dec_y = np.concatenate([p.decode_only_y_s for p in fit.runs])
    dec_pred = np.concatenate([p.decode_only_pred_s for p in fit.runs])
    return {"coefficients": coefs, "offset_s": fit.offset_s, "iterations": fit.iterations,
            "priors": {c: fam.prior.get(c) for c in fit.free}, "prior_detail": dict(fam.detail),
            "residuals": {"decode_spans": _residuals(fit.pred_s[fit.rows_kind == "decode"],
                                                     fit.y_s[fit.rows_kind == "decode"]),
                          "prefill_spans": _residuals(fit.pred_s[fit.rows_kind == "prefill"],
                                                      fit.y_s[fit.rows_kind == "prefill"]),
                          "decode_only_stretches": _residuals(dec_pred, dec_y),
                          # the engine core's own latency sums (traces.stepfit.engine_sum_rows), where recorded
                          **{k: _residuals(fit.pred_s[fit.rows_kind == k], fit.y_s[fit.rows_kind == k])
                             for k in ENGINE_SUM_KINDS if (fit.rows_kind == k).any()}}}


def _reconstruction(part: RunFit, fit: StepFit) -> dict:
    tr, kind, err = part.trace, fit.rows_kind[part.rows], part.event_errors_s
    return {"observed_step_boundaries": len(part.events), "batched_boundaries": part.events.num_batched,
            "engine_steps": tr.num_steps, "preemptions": int(tr.num_preemptions.sum()),
            "preempted_requests": int((tr.num_preemptions > 0).sum()),
            "decode_span_rows": int((kind == "decode").sum()), "prefill_span_rows": int((kind == "prefill").sum()),
            "decode_only_stretches": int(len(part.decode_only_y_s)),
            "event_time_error_s": {"median_abs": float(np.median(np.abs(err))) if len(err) else None,
                                   "p90_abs": float(np.percentile(np.abs(err), 90)) if len(err) else None}}


def _model_name(model, runs) -> str:
    return model.spec.name if model is not None else runs[0].meta.model


def report(*, runs, masks, fit_fraction, seed, gpu_entry, gpu_src, hw, model, cap, engine, fit: StepFit,
           profile: sim.Profile, mult, refine_info, final, overhead_source, family_reason: str = "") -> dict:
    """The JSON-ready report of one calibration (see the module docstring); ``gpu_entry``, ``hw`` and ``model``
    are ``None`` where unknown (the shape-free model was fitted)."""
    peak = max(int(p.trace.used_blocks.max(initial=0)) for p in fit.runs)
    preempted = any(p.trace.num_preemptions.sum() > 0 for p in fit.runs)
    ov = profile.overheads
    return {
        "run": "+".join(r.name for r in runs), "run_dir": str(runs[0].path) if len(runs) == 1 else
        [str(r.path) for r in runs], "fit_fraction": fit_fraction, "fit_requests": int(sum(m.sum() for m in masks)),
        "seed": seed, "step_time_model": fit.family.latency_model, "step_time_model_reason": family_reason,
        "hardware": {"name": None if hw is None else hw.name, "table_entry": None if gpu_entry is None else
                     gpu_entry.key, "identified_by": gpu_src, "peak_flops": None if hw is None else hw.peak_flops,
                     "mem_bw_bytes_per_s": None if hw is None else hw.mem_bw_bytes_per_s},
        "model": _model_name(model, runs), "model_shape_known": model is not None,
        "tensor_parallel_size": runs[0].engine.tensor_parallel_size,
        "engine": {k: getattr(engine, k) for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                                   "block_size", "num_gpu_blocks", "enable_prefix_caching",
                                                   "scheduler_reserve_full_isl")},
        "kv_capacity": {"num_gpu_blocks": cap.num_gpu_blocks, "measured": cap.measured, "method": cap.method,
                        "inferred": not cap.measured, "source": cap.source, "detail": cap.detail,
                        "block_size": cap.block_size, "block_size_source": cap.block_size_source,
                        "block_size_inferred": cap.block_size_source.startswith("INFERRED"), "peak_used_blocks_reconstructed": peak,
                        "binding": bool(preempted or peak >= 0.95 * (cap.num_gpu_blocks - 1))},
        "runs": [{"run": r.name, "run_dir": str(r.path), "timestamps": r.timestamps, "fit_requests": int(m.sum()),
                  "async_scheduling": r.engine.async_scheduling, "reconstruction": _reconstruction(p, fit),
                  "fit_errors_pct": {k: {s: e[k][s]["error_pct"] for s in e[k]} for k in e}}
                 for r, m, p, e in zip(runs, masks, fit.runs, final, strict=True)],
        "nnls": _nnls_report(fit, profile.latency_coefficients),
        "physical_reading": (_physical(profile.latency_coefficients, hw) if fit.family.latency_model == "physics"
                             else None),
        "refinement": {"multipliers": mult, **refine_info},
        "overheads": {"frontend_s": ov.frontend_s, "post_decode_s": ov.post_decode_s,
                      "per_output_token_s": ov.per_output_token_s, "frontend_fitted": fit.offset_s is not None,
                      "source": overhead_source},
    }


def _physical(coef: dict[str, float], hw: sim.HardwareSpec) -> dict:
    """What the fitted factors say about the hardware, and a warning where a factor beats the roofline."""
    out = {"weight_stream_bandwidth_fraction": 1 / coef["weight"] if coef["weight"] else None,
           "decode_kv_bandwidth_fraction": 1 / coef["dc_kv"] if coef["dc_kv"] else None,
           "prefill_mfu": 1 / coef["pf_compute"] if coef["pf_compute"] else None,
           "peak_flops": hw.peak_flops, "mem_bw_bytes_per_s": hw.mem_bw_bytes_per_s, "notes": []}
    for k, what in (("weight_stream_bandwidth_fraction", "weight streaming"), ("decode_kv_bandwidth_fraction",
                    "decode KV reads"), ("prefill_mfu", "prefill compute")):
        if out[k] is not None and out[k] > 1:
            out["notes"].append(f"{what} at {100 * out[k]:.0f} % of the table's peak: the additive basis counts "
                                "overlapping compute and memory time twice and collinear terms share the time, "
                                "so the factors' sum is meaningful, not their split (or the table's peak is low)")
    return out


def profile_provenance(runs, hw, model, cap, fit_fraction, seed, gpu_entry, gpu_src, hardware, engine_sources,
                       fit: StepFit, mult, overhead_source, multipliers) -> tuple[str, dict[str, str], dict]:
    """The calibrated profile's ``description``, ``sources`` and ``derived_from`` (``multipliers``: the
    refinement's multiplier name -> the coefficients it scales)."""
    part = "" if fit_fraction is None else f" (first {fit_fraction:g} of their arrivals)"
    kv = "measured" if cap.measured else ("NOT BINDING (assumed)" if cap.method == "not_binding" else "ESTIMATED")
    timed = "/".join(sorted({r.timestamps for r in runs}))
    versions = ", ".join(sorted({r.meta.vllm_version or "?" for r in runs}))
    shape_free = "" if fit.family.latency_model == "physics" else " with the shape-free step-time model"
    description = (f"{_model_name(model, runs)} on {'unknown hardware' if hw is None else hw.name}, calibrated by "
                   f"traces.calibrate{shape_free} from the measured vLLM ({versions}) run(s) "
                   f"{', '.join(r.name for r in runs)}{part} ({timed}-side times); engine settings of the run(s); "
                   f"KV capacity {kv}.")
    return description, _sources(runs, gpu_entry, gpu_src, hardware, model, engine_sources, fit, mult,
                                 overhead_source, multipliers), _derived_from(runs, fit_fraction, seed)


def _sources(runs, gpu_entry, gpu_src, hardware, model, engine_sources, fit: StepFit, mult, overhead_source,
             multipliers) -> dict[str, str]:
    out = {}
    for k in ("peak_flops", "mem_bw_bytes_per_s", "memory_bytes", "interconnect_bw_bytes_per_s"):
        if hardware is not None:
            out[f"hardware.{k}"] = "given by the caller (the hardware of the profile passed to the replay)"
        elif gpu_entry is not None and k in gpu_entry.sources:
            out[f"hardware.{k}"] = f"{gpu_entry.sources[k]}; GPU {gpu_src}"
    if gpu_entry is None and hardware is None:
        out["hardware"] = f"not in the profile: GPU {gpu_src}; the shape-free step-time model needs none"
    out["model"] = (model.sources.get("model", "traces.hardware.MODELS") if model is not None else
                    f"not in the profile: the shape of {runs[0].meta.model!r} is unknown; the shape-free step-time "
                    "model needs none")
    out.update(engine_sources)
    n_dec = int((fit.rows_kind == "decode").sum())
    n_pre = int((fit.rows_kind == "prefill").sum())
    names = " + ".join(r.name for r in runs)
    for n in fit.family.names:
        if n in fit.free:
            m = next(k for k, names_ in multipliers.items() if n in names_)
            out[f"latency.coefficients.{n}"] = (f"NNLS on {n_dec} decode spans and {n_pre} prefill spans "
                                                f"reconstructed from run {names} (= {fit.coefficients[n]:.6g})"
                                                f", x {mult[m]:.4f} by the replay refinement (multiplier {m!r})")
        else:
            out[f"latency.coefficients.{n}"] = fit.family.held[n]
    out["overheads"] = overhead_source
    return out


def _derived_from(runs: Sequence, fit_fraction, seed) -> dict:
    per_run = [{"run": r.name, "timestamps": r.timestamps, "vllm_version": r.meta.vllm_version,
                "dataset_hash": r.meta.dataset_hash, "files": {n: {"sha256": h} for n, h in sorted(r.file_sha256.items())}}
               for r in runs]
    common = {"model": runs[0].meta.model, "tool": "traces.calibrate.calibrate_runs", "fit_fraction": fit_fraction,
              "seed": seed}
    if len(runs) == 1:  # flat, as every single-run profile has it
        one = {k: v for k, v in per_run[0].items() if k != "timestamps" or v != "engine"}
        return {**one, **common, "tool": "traces.calibrate.calibrate_run"}
    return {"run": "+".join(r.name for r in runs), "runs": per_run, **common}


def format_report(report: dict) -> str:
    """The human-readable fit report: settings, reconstruction, coefficients with units, residuals, errors."""
    r, kv = report, report["kv_capacity"]
    lines = [f"run {r['run']}  model {r['model']}  GPU {r['hardware']['name'] or 'unknown'} "
             f"({r['hardware']['identified_by']})",
             f"step-time model: {r['step_time_model']} ({r['step_time_model_reason']})",
             "engine: " + "  ".join(f"{k}={v}" for k, v in r["engine"].items()),
             f"KV capacity: {kv['num_gpu_blocks']} blocks, {kv['method']}: {kv['source']}",
             f"  block size {kv['block_size']}: {kv['block_size_source']}",
             f"  reconstructed peak use {kv['peak_used_blocks_reconstructed']} blocks: the capacity is "
             f"{'binding (preemptions)' if kv['binding'] else 'not binding for this run'}"]
    for part in r["runs"]:
        rec, err = part["reconstruction"], part["reconstruction"]["event_time_error_s"]
        lines += [f"run {part['run']} ({part['timestamps']}-side times, {part['fit_requests']} fit requests): "
                  f"{rec['observed_step_boundaries']} observed step boundaries ({rec['batched_boundaries']} shared by "
                  f"several requests), {rec['engine_steps']} engine steps, {rec['preemptions']} preemptions of "
                  f"{rec['preempted_requests']} requests",
                  f"  rows: {rec['decode_span_rows']} decode spans, {rec['prefill_span_rows']} prefill spans, "
                  f"{rec['decode_only_stretches']} decode-only stretches (check); reconstructed token times off by "
                  + (f"{err['median_abs']:.3f} s median, {err['p90_abs']:.3f} s p90" if err["median_abs"] is not None
                     else "(no events)")]
    lines += ["", "coefficients:"]
    for n, c in r["nnls"]["coefficients"].items():
        lines.append(f"  {n:11s} {c['value']:12.6g}  (NNLS {c['nnls']:.6g})  {c['unit']:38s} {c['status']}")
    ov = r["overheads"]
    lines.append(f"  frontend_s  {ov['frontend_s']:12.6g}  "
                 + (f"(NNLS {r['nnls']['offset_s']:.6g})  client-side constant (frontend + HTTP), fitted"
                    if ov["frontend_fitted"] else "client-side constant, measured (engine latency sums)"
                    if ov["source"].startswith("frontend_s: the client-side constant (API server frontend and HTTP) "
                                               "MEASURED") else "prior (not identifiable from engine-side times)"))
    lines.append("residuals of the NNLS fit (relative, per row):")
    for k, v in r["nnls"]["residuals"].items():
        if v["rows"]:
            lines.append(f"  {k:22s} rows {v['rows']:4d}  median |err| {v['median_abs_rel_pct']:5.2f} %  "
                         f"p90 |err| {v['p90_abs_rel_pct']:5.2f} %  total bias {v['bias_pct']:+.2f} %")
    ph = r["physical_reading"]
    if ph is not None:
        lines.append(f"reading: weight streaming at {100 * (ph['weight_stream_bandwidth_fraction'] or 0):.0f} % of "
                     f"peak bandwidth, decode KV reads at {100 * (ph['decode_kv_bandwidth_fraction'] or 0):.0f} %, "
                     f"prefill MFU {100 * (ph['prefill_mfu'] or 0):.0f} % of {ph['peak_flops'] / 1e12:.0f} TFLOP/s")
        lines += [f"  note: {n}" for n in ph["notes"]]
    ref = r["refinement"]
    lines.append("refinement: " + "  ".join(f"{k} x{v:.4f}" for k, v in ref["multipliers"].items())
                 + f"  ({ref['evaluations']} replays, objective {ref['objective_start']:.4g} -> "
                   f"{ref['objective_best']:.4g})")
    dp = r.get("data_parallel") or {}
    for run, mode in dp.get("engine_sums", {}).items():
        per = (dp.get("rounds") or [{}])[-1].get("requests_per_engine", {}).get(run)
        lines.append(f"data parallel, run {run}: the engine cores' latency sums fitted {mode}"
                     + (f" (the split gives the engines {per} requests)" if per is not None else ""))
    for part in r["runs"]:
        lines.append(f"replay errors on the fit requests of {part['run']} (%):")
        for m, st in part["fit_errors_pct"].items():
            lines.append(f"  {m:7s} " + "  ".join(f"{s} {'n/a':>6s}" if v is None else f"{s} {v:+6.2f}"
                                               for s, v in st.items()))
    return "\n".join(lines)
