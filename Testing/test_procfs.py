"""unifuse.procfs: the one reader of /proc key: value files (meminfo, cpuinfo, self/status)."""

from __future__ import annotations

import sys

import pytest

from unifuse.procfs import cpu_model, proc_bytes, proc_value


def test_kb_fields_in_bytes_and_missing_keys_or_files_give_none(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t1024 kB\nmodel name\t: Some CPU @ 2.0GHz\n")
    assert proc_bytes(str(status), "VmHWM") == 2048 * 1024
    assert proc_bytes(str(status), "VmRSS") == 1024 * 1024
    assert proc_value(str(status), "model name") == "Some CPU @ 2.0GHz"
    assert proc_value(str(status), "Vm") is None and proc_bytes(str(status), "Name") is None
    assert proc_bytes(str(tmp_path / "absent"), "VmRSS") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux only")
def test_matches_the_line_parsers_it_replaced():
    with open("/proc/meminfo") as fh:
        total = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemTotal:"))
    assert proc_bytes("/proc/meminfo", "MemTotal") == total
    assert proc_bytes("/proc/self/status", "VmRSS") > 0
    with open("/proc/cpuinfo") as fh:
        names = [line.split(":", 1)[1].strip() for line in fh if line.lower().startswith("model name")]
    assert cpu_model() == (names[0] if names else cpu_model())
