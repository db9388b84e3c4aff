"""The Azure 2023 CSVs: the shared files, and malformed input."""

import pytest

from traces.azure import read_azure_trace
from traces.errors import TraceFormatError


def test_shared_azure_traces(traces_dir):
    code = read_azure_trace(traces_dir / "azure2023" / "AzureLLMInferenceTrace_code.csv")
    conv = read_azure_trace(traces_dir / "azure2023" / "AzureLLMInferenceTrace_conv.csv")
    assert (len(code), len(conv)) == (8819, 19366)
    assert code.duration_s == pytest.approx(57.3 * 60, rel=0.002)
    assert conv.rate_per_s == pytest.approx(5.53, abs=0.01)
    assert conv.prompt_tokens.max() == 14050 and code.output_tokens.max() == 1899
    assert code.start.microsecond == 979960  # 7 fractional digits, truncated to microseconds


def test_malformed_rows(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:17:03.9799600,10,5\r\n"
                  b"2023-11-16 18:17:04.0000000,ten,5\r\n2023-11-16 18:17:05.1000000,7,3")
    with pytest.raises(TraceFormatError, match=r"a.csv:3: field ContextTokens"):
        read_azure_trace(p)
    t = read_azure_trace(p, skip_bad=True)
    assert len(t) == 2 and t.skipped == 1
    p.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:17:03.9,10,5\r\n"
                  b"2023-11-16 18:17:02.0,1,1")
    with pytest.raises(TraceFormatError, match=r"a.csv:3: field TIMESTAMP: timestamp goes backwards"):
        read_azure_trace(p)
