"""README's performance table against the benchmark CSV it quotes (CPU only).

The README names the kernel version of its table ("kernel vN."); docs/ keeps that run's CSV as
``bench_h100_<date>_vN.csv``. Every figure of the table must be that CSV's, rounded as printed, and
no later version's CSV may exist without the README quoting it.
"""

import csv
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "| case | ms | efficiency | copy | x torch.compile | x DeepSpeed |"
# Table rows whose first cell is not the case's name.
ALIASES = {"262144 keys": "k256k", "1048576 keys": "k1m"}


def _performance_section():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("## Performance")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _table(section):
    lines = section.splitlines()
    i = lines.index(HEADER) + 2  # past the separator
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    return rows


def _version(section):
    found = re.findall(r"kernel v(\d+)\.", section)
    assert found, "the performance section names no kernel version ('kernel vN.')"
    return int(found[0])


def _csv_versions():
    out = {}
    for path in glob.glob(os.path.join(ROOT, "docs", "bench_h100_*_v*.csv")):
        m = re.search(r"_v(\d+)\.csv$", path)
        if m:
            out.setdefault(int(m.group(1)), []).append(path)
    return out


def _leading_float(cell):
    m = re.match(r"[0-9]+(?:\.[0-9]+)?", cell)
    return float(m.group(0)) if m else None


def _close(printed, value, decimals):
    return abs(printed - value) <= 0.5 * 10 ** -decimals + 1e-9


def test_readme_quotes_the_latest_bench_csv():
    section = _performance_section()
    version = _version(section)
    versions = _csv_versions()
    assert versions.get(version), f"README quotes kernel v{version}, docs/ has no bench_h100_*_v{version}.csv"
    assert len(versions[version]) == 1, versions[version]
    assert version == max(versions), f"docs/ has a CSV of v{max(versions)}, README quotes v{version}"


def test_readme_table_matches_its_csv():
    section = _performance_section()
    (path,) = _csv_versions()[_version(section)]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    by = {(r["case"], r["contender"]): r for r in rows}
    tp_cases = [r["case"] for r in rows if r["contender"] == "tp_softmax"]
    table = _table(section)
    named = []
    for cells in table:
        assert len(cells) == 6, cells
        head = cells[0].split(" (")[0]
        case = ALIASES.get(head, head)
        named.append(case)
        tp = by.get((case, "tp_softmax"))
        assert tp is not None and tp["status"] == "ok", f"{case}: no tp_softmax row in {os.path.basename(path)}"
        ms = float(tp["ms"])
        assert _close(float(cells[1]), ms, 3), (case, "ms", cells[1], ms)
        assert _close(float(cells[2]), float(tp["efficiency"]), 2), (case, "efficiency", cells[2], tp["efficiency"])
        copy = by[(case, "copy")]
        copy_eff = float(copy["floor_ms"]) / float(copy["floor_copy_ms"])
        assert _close(float(cells[3]), copy_eff, 2), (case, "copy", cells[3], copy_eff)
        for cell, contender in ((cells[4], "compile"), (cells[5], "deepspeed")):
            other = by.get((case, contender))
            printed = _leading_float(cell)
            if other is not None and other["status"] == "ok":
                assert printed is not None, (case, contender, cell)
                ratio = float(other["ms"]) / ms
                assert _close(printed, ratio, 2), (case, contender, cell, ratio)
            else:
                assert printed is None, (case, contender, cell, "the CSV has no timing")
    assert sorted(named) == sorted(tp_cases), "the table and the CSV list different cases"


def test_table_parser_sees_a_wrong_figure():
    # The comparison above fails on a figure that differs from the CSV by more than its rounding.
    assert _close(0.290, 0.290368, 3)
    assert not _close(0.291, 0.290368, 3)
    assert not _close(0.81, 0.8159, 2)
    with pytest.raises(ValueError):
        _table("no table here")
