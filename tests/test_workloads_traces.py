"""Workload generators and the Azure trace reader."""

import numpy as np
import pytest

from sim import (
    EmpiricalLengths,
    GammaArrivals,
    PoissonArrivals,
    PoolSpec,
    TraceArrivals,
    Workload,
    make_world,
)
from traces.azure import azure_trace, read_azure_trace

from .helpers import constant_profile


def _gaps(arrivals, n, seed=0):
    it = arrivals.gaps(np.random.default_rng(seed))
    return np.array([next(it) for _ in range(n)])


def test_poisson_and_gamma_rates_and_burstiness():
    p = _gaps(PoissonArrivals(5.0), 50_000)
    assert p.mean() == pytest.approx(0.2, rel=0.02) and p.std() / p.mean() == pytest.approx(1.0, rel=0.03)
    g = _gaps(GammaArrivals(5.0, cv=3.0), 50_000)
    assert g.mean() == pytest.approx(0.2, rel=0.05) and g.std() / g.mean() == pytest.approx(3.0, rel=0.08)
    with pytest.raises(ValueError):
        PoissonArrivals(0)


def test_trace_arrivals_replay_offsets_exactly():
    w = make_world(PoolSpec(name="p", profile=constant_profile(0.001)), seed=0, sample_interval_s=None)
    off = np.array([0.0, 0.5, 0.5, 2.25])
    Workload(pool="p", arrivals=TraceArrivals(off), prompt_tokens=np.array([5, 6, 7, 8]),
             output_tokens=np.array([2, 2, 2, 2]), start_s=1.0).start(w)
    w.run_until_idle()
    df = w.records.to_dataframe().sort_values("arrival_s")
    np.testing.assert_allclose(df["arrival_s"], off + 1.0)
    assert df["prompt_tokens"].tolist() == [5, 6, 7, 8]


def test_arrivals_and_lengths_are_independent_streams():
    """Common random numbers: the same seed gives the same arrivals whatever the length model."""
    from sim import FixedLengths, LognormalLengths

    def arrivals(lengths):
        w = make_world(PoolSpec(name="p", profile=constant_profile(0.001)), seed=5, sample_interval_s=None)
        Workload(pool="p", arrivals=PoissonArrivals(50.0), lengths=lengths, num_requests=200).start(w)
        w.run_until_idle()
        return np.sort(w.records.to_dataframe()["arrival_s"].to_numpy())

    np.testing.assert_array_equal(arrivals(FixedLengths(10, 5)), arrivals(LognormalLengths(300, 50)))


def test_azure_traces_read_in_place(traces_dir):
    conv = azure_trace("conv")
    assert len(conv) == 19_366 and conv.prompt_tokens.mean() == pytest.approx(1155, abs=1)
    assert conv.rate_per_s == pytest.approx(5.53, abs=0.01)
    code = read_azure_trace(traces_dir / "azure2023" / "AzureLLMInferenceTrace_code.csv")
    assert len(code) == 8_819 and code.output_tokens.max() == 1899
    lengths = EmpiricalLengths(conv.prompt_tokens, conv.output_tokens)
    p, o = lengths.draw(np.random.default_rng(0), 10_000)
    assert p.mean() == pytest.approx(1155, rel=0.05) and o.mean() == pytest.approx(211, rel=0.05)


def test_missing_traces_dir_says_where_to_put_it(monkeypatch, tmp_path):
    from traces.paths import TracesNotFound, traces_dir

    monkeypatch.setenv("MASLAT_TRACES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(TracesNotFound, match="set MASLAT_TRACES_DIR"):
        traces_dir()
