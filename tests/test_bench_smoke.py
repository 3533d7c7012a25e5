"""launch/bench.py: the byte floor, the float64 check, and smoke runs on CPU (one process and
two processes under torchrun with gloo)."""

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


if str(LAUNCH) not in sys.path:
    sys.path.insert(0, str(LAUNCH))

import bench  # noqa: E402  (launch/bench.py)
import benchlib as bl  # noqa: E402  (launch/benchlib.py)


# ---------------------------------------------------------------------------------------------
# The floor, hand-computed
# ---------------------------------------------------------------------------------------------

def test_floor_causal_prefill_reads_the_lower_triangle():
    # Q = K = 4, causal: rows see 1, 2, 3, 4 keys -> 10 scores read; 16 written; fp16.
    fb = bl.floor_bytes(1, 1, 4, 4, 2, causal=True)
    assert (fb.scores_read, fb.output_written, fb.extras_read) == (20, 32, 0)
    assert fb.total == 52


def test_floor_kv_cache_window_and_broadcast_mask():
    # Q = 3, K = 6, causal + window 2 (rows sit at 3, 4, 5): keys {2,3}, {3,4}, {4,5} -> 6 read.
    # A [1,1,1,K] fp32 mask is needed only where some row looks: keys 2..5 -> 4 elements.
    fb = bl.floor_bytes(1, 1, 3, 6, 2, causal=True, window=2, extras=[((1, 1, 1, 6), 4)])
    assert (fb.scores_read, fb.output_written, fb.extras_read) == (12, 36, 16)
    assert fb.total == 64


def test_floor_decode_with_pad_mask_and_local_alibi():
    # B=2, H_local=3, Q=1, K=8 fp16: 48 scores read and written; mask [2,1,1,8] -> 16
    # elements; alibi of the local heads [2,3,1,8] -> 48 elements.
    fb = bl.floor_bytes(2, 3, 1, 8, 2, extras=[((2, 1, 1, 8), 2), ((2, 3, 1, 8), 2)])
    assert (fb.scores_read, fb.output_written, fb.extras_read) == (96, 96, 128)
    assert fb.total == 320


def test_floor_more_queries_than_keys_and_window_only():
    # Q=4 > K=2, causal: rows sit at -2, -1, 0, 1 -> 0, 0, 1, 2 keys.
    assert bl.floor_bytes(1, 1, 4, 2, 4, causal=True).scores_read == 3 * 4
    # window 2 without causal hides only the left: rows see 4, 4, 3, 2 keys.
    assert bl.floor_bytes(1, 1, 4, 4, 2, window=2).scores_read == 13 * 2


def test_floor_per_row_mask_and_slopes():
    # A full [B,H,Q,K] mask is needed exactly where scores are: 2*3*(1+2+3) elements.
    fb = bl.floor_bytes(2, 3, 3, 3, 2, causal=True, extras=[((2, 3, 3, 3), 1)])
    assert fb.extras_read == 36
    # Slopes [1,H,1,1] float32: one read per local head.
    assert bl.floor_bytes(1, 5, 7, 7, 2, extras=[((1, 5, 1, 1), 4)]).extras_read == 20
    # A row-broadcast mask [1,1,Q,1] counts the rows that see a key: Q=4 > K=2 -> 2 rows.
    assert bl.needed_elements((1, 1, 4, 1), 4, 2, True, None) == 2


@pytest.mark.parametrize("q,k", [(1, 1), (1, 9), (5, 5), (3, 11), (7, 4)])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, 1), (False, 3),
                                           (True, 2), (True, 100)])
def test_visible_counts_match_brute_force(q, k, causal, window):
    i = torch.arange(q).unsqueeze(1)
    j = torch.arange(k).unsqueeze(0)
    pos = i + k - q
    seen = torch.ones(q, k, dtype=torch.bool)
    if causal:
        seen &= j <= pos
    if window is not None:
        seen &= j > pos - window
    assert bl.visible_counts(q, k, causal, window).tolist() == seen.sum(1).tolist()
    assert bl.needed_elements((1, 1, 1, k), q, k, causal, window) == int(seen.any(0).sum())
    assert bl.needed_elements((2, 1, q, k), q, k, causal, window) == 2 * int(seen.sum())


def test_floor_of_a_smoke_case_in_the_csv_matches_hand_count(smoke_run):
    rows, _ = smoke_run
    row = next(r for r in rows if r["case"] == "bloom176b-prefill-tp2" and r["contender"] == "tp_softmax")
    # Smoke shape: B=1, H_local=3, Q=K=48, fp16, causal + alibi + pad.
    visible = 48 * 49 // 2
    expected = 3 * visible * 2 + 3 * 48 * 48 * 2 + 48 * 2 + 3 * 48 * 2
    assert int(row["floor_bytes"]) == expected


def test_pad_lengths_differ_per_row():
    assert bl.pad_lengths(4, 64) == [4, 8, 12, 16]
    assert bl.pad_lengths(1, 2048) == [512]


# ---------------------------------------------------------------------------------------------
# Cases and the float64 check
# ---------------------------------------------------------------------------------------------

def test_parse_case():
    c = bl.parse_case("mine=2,3,4,5,40,bf16,causal+alibi+pad+window=7+scale=0.5")
    assert (c.name, c.dtype, c.B, c.H, c.mp, c.Q, c.K) == ("mine", "bf16", 2, 3, 4, 5, 40)
    assert (c.causal, c.alibi, c.pad, c.window, c.scale, c.H_total) == (True, True, True, 7, 0.5, 12)
    c = bl.parse_case("1,2,1,1,9,float32")
    assert c.flags == "-" and c.dtype == "fp32" and c.name.startswith("case-")
    for bad in ("1,2,3", "1,2,1,1,9,int8", "1,2,1,1,9,fp16,bogus", "1,2,1,1,9,fp16,alibi+slopes",
                "0,2,1,1,9,fp16", "1,2,1,1,9,fp16,window=0"):
        with pytest.raises(ValueError):
            bl.parse_case(bad)


def test_only_picks_named_cases_and_command_line_cases_always_run():
    args = bench.parse_args(["--only", "gpt-*,bert-b32-s512", "--case", "mine=1,2,1,4,8,fp16,causal"])
    assert [c.name for c in args.cases] == ["gpt-prefill-b8", "bert-b32-s512", "mine"]
    args = bench.parse_args(["--only", "bloom176b-tp4"])
    assert [c.name for c in args.cases] == ["bloom176b-tp4"]
    args = bench.parse_args(["--case", "mine=1,2,1,4,8,fp16"])
    assert [c.name for c in args.cases] == [c.name for c in bl.PUBLIC_CASES] + ["mine"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "no-such-case"])


def test_public_table_is_reproduced():
    table = {c.name: (c.dtype, c.shape_text(), c.flags) for c in bl.PUBLIC_CASES}
    assert table == {
        "bloom176b-prefill-tp2": ("fp16", "1,56,2,2048,2048", "causal+alibi+pad"),
        "gpt-prefill-b8": ("bf16", "8,16,1,1024,1024", "causal+pad"),
        "bert-b32-s512": ("fp16", "32,16,1,512,512", "pad"),
        "long-8k": ("fp16", "1,16,1,8192,8192", "causal"),
        "long-16k": ("fp16", "1,8,1,16384,16384", "causal"),
        "long-32k": ("bf16", "1,2,1,32768,32768", "causal"),
        "decode-b64-k4k": ("fp16", "64,32,4,1,4096", "alibi+pad"),
        "decode-b8-k64k": ("bf16", "8,32,1,1,65536", "-"),
        "fp32-alibi-s512": ("fp32", "4,16,2,512,512", "causal+alibi"),
        "window-4k-w1k": ("fp16", "2,16,1,4096,4096", "causal+window=1024"),
    }
    tp4 = next(c for c in bl.EXTRA_CASES if c.name == "bloom176b-tp4")
    assert (tp4.H, tp4.H_total, tp4.Q, tp4.K, tp4.flags) == (28, 112, 2048, 2048,
                                                               "causal+alibi+pad+scaling")


def _problem(spec, heads=None, offset=None):
    case = bl.parse_case(spec)
    heads = case.H if heads is None else heads
    offset = (case.mp - 1) * case.H if offset is None else offset
    return bl.make_problem(case, bl.Shard(0, offset, heads), torch.device("cpu"), seed=3,
                           n_sets=1, n_sample=16)


@pytest.mark.parametrize("spec", ["t=2,3,2,6,20,fp32,causal+alibi+pad",
                                  "t=3,2,3,1,33,fp32,slopes+pad+window=5+scale=0.3",
                                  "t=2,2,1,17,17,fp32,causal+window=4+pad",
                                  "t=2,3,2,6,20,fp32,causal+alibi+boolpad"])
def test_reference_rows_agree_with_tp_softmax(spec):
    from tp_softmax import attention_softmax

    p = _problem(spec)
    st, c = p.sets[0], p.case
    out = attention_softmax(st["scores"], layer_scale=c.scale, alibi=st["alibi"],
                            alibi_slopes=st["slopes"], mask=st["mask"], causal=c.causal,
                            window=c.window, head_offset=p.shard.head_offset)
    chk = bl.check_output(out, p)
    assert chk.err < 1e-5 and chk.nan_rows == 0 and chk.sum_err < 1e-5
    assert chk.masked_rows in ("", "zeros")


def bench_rows_blind(p):
    return [tuple(x) for x in torch.nonzero(~bl.row_has_visible(p.case)).tolist()]


def test_check_output_catches_wrong_and_unwritten_rows():
    p = _problem("t=2,3,1,9,9,fp32,causal+pad")
    st, c = p.sets[0], p.case
    good = bl.reference_rows(st, *[t.flatten() for t in torch.meshgrid(
        torch.arange(2), torch.arange(3), torch.arange(9), indexing="ij")], case=c,
        head_offset=0).to(torch.float32).view(2, 3, 9, 9)
    chk = bl.check_output(good, p)
    assert chk.err < 1e-6 and chk.masked_rows == "zeros" and chk.nan_rows == 0 and chk.sum_err < 1e-6
    # Batch row 1 has 2 padded keys, so its causal query rows 0 and 1 see no key: they must be
    # zeros, not NaN (what torch.softmax gives); the sample holds one of them.
    assert bench_rows_blind(p) == [(0, 0), (1, 0), (1, 1)]
    assert bool(p.sample.visible.all()) is False
    nan = good.clone()
    nan[1, :, :2] = float("nan")
    chk = bl.check_output(nan, p)
    assert chk.masked_rows == "NaN" and chk.nan_rows == 6
    # One unwritten element anywhere shows in the row sums even if no sampled row has it.
    hole = good.clone()
    hole[0, 1, 5, 2] = float("nan")
    assert bl.check_output(hole, p).nan_rows == 1
    # A wrong value on a sampled row that sees keys shows as an error.
    k = int(torch.nonzero(p.sample.visible)[0])
    b, h, i = (int(p.sample.b[k]), int(p.sample.h[k]), int(p.sample.i[k]))
    wrong = good.clone()
    wrong[b, h, i, i] += 0.25
    chk = bl.check_output(wrong, p)
    assert abs(chk.err - 0.25) < 1e-6 and abs(chk.sum_err - 0.25) < 1e-6


def test_boolpad_is_the_same_padding_as_a_bool_mask():
    c = bl.parse_case("b=3,2,2,5,24,fp16,causal+alibi+boolpad")
    assert (c.pad, c.boolpad, c.padded, c.flags) == (False, True, True, "causal+alibi+boolpad")
    with pytest.raises(ValueError):
        bl.parse_case("3,2,2,5,24,fp16,pad+boolpad")
    p, q = _problem("b=3,2,2,5,24,fp16,causal+alibi+boolpad"), _problem("b=3,2,2,5,24,fp16,causal+alibi+pad")
    m, additive = p.sets[0]["mask"], q.sets[0]["mask"]
    assert m.dtype == torch.bool and m.shape == (3, 1, 1, 24)
    assert torch.equal(m, additive == 0)                          # False exactly on the padding
    assert int((~m).sum()) == sum(bl.pad_lengths(3, 24)) > 0
    # The same alibi positions (counted from the first unpadded key) and the same blind rows.
    assert torch.equal(p.sets[0]["alibi"], q.sets[0]["alibi"])
    assert torch.equal(bl.row_has_visible(p.case), bl.row_has_visible(q.case))
    # The mask is one byte a key in the floor, where the additive one is two (fp16).
    needed = bl.needed_elements((3, 1, 1, 24), 5, 24, True, None)
    assert needed > 0 and q.floor.extras_read - p.floor.extras_read == needed * (2 - 1)
    ops_b = dict(enumerate(bl.operand_shapes(p.case, torch.float16)))
    ops_a = dict(enumerate(bl.operand_shapes(q.case, torch.float16)))
    assert ops_b[0] == ((3, 1, 1, 24), 1) and ops_a[0] == ((3, 1, 1, 24), 2)
    assert ops_b[1] == ops_a[1] == ((3, 2, 1, 24), 2)
    # The torch composition reads the bool mask as SDPA does: False hides the key.
    st = p.sets[0]
    out = bl.eager_softmax(st["scores"].float(), 1.0, st["alibi_local"].float(), None, m, True, None)
    assert bl.check_output(out, p).err < 1e-6
    assert bl.deepspeed_refusal(p.case, 2).startswith("not supported: bool masks")


def test_sets_for_cache():
    assert bl.sets_for_cache(10 << 30, 50 << 20) == 1
    assert bl.sets_for_cache(30 << 20, 50 << 20) == 5
    assert bl.sets_for_cache(1, 50 << 20) == 32
    assert bl.sets_for_cache(1 << 20, 0) == 1


def test_deepspeed_refusals():
    by = {c.name: c for c in bl.PUBLIC_CASES}
    assert bl.deepspeed_refusal(by["decode-b8-k64k"], 32) == "refuses (K > 32768)"
    assert bl.deepspeed_refusal(by["long-32k"], 2) is None
    assert bl.deepspeed_refusal(bl.parse_case("1,4,1,32768,32768,fp16"), 4).startswith("not run")
    assert bl.deepspeed_refusal(bl.parse_case("1,4,1,8,8,fp16,slopes"), 4).startswith("not supported")


def test_plan_shards_use_head_partition():
    tp4 = next(c for c in bl.EXTRA_CASES if c.name == "bloom176b-tp4")
    steps = bench.plan(tp4, 4, list(bl.CONTENDERS))
    full, shards = steps
    assert full[0].name == "bloom176b-tp4@1rank" and full[1] == {0: [(0, bl.Shard(0, 0, 112))]}
    assert full[2] == ["copy", "tp_softmax"] and full[3] is False
    assert {r: s[0][1].head_offset for r, s in shards[1].items()} == {0: 0, 1: 28, 2: 56, 3: 84}
    assert shards[3] is True
    # One process: the 4 shards one after another.
    assert [vr for vr, _ in bench.plan(tp4, 1, ["tp_softmax"])[1][1][0]] == [0, 1, 2, 3]
    # A public case on one process is the last rank's shard.
    bloom = bl.PUBLIC_CASES[0]
    (case, shards, _, _), = bench.plan(bloom, 1, ["tp_softmax"])
    assert shards == {0: [(1, bl.Shard(1, 56, 56))]}


# ---------------------------------------------------------------------------------------------
# Smoke runs of the launcher
# ---------------------------------------------------------------------------------------------

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def _read(out_dir):
    with open(out_dir / "bench.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(LAUNCH / "bench.py"), "--smoke", "--device", "cpu",
                           "--out", str(out), "--seed", "11"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fields, rows = _read(out)
    assert fields == bench.CSV_COLUMNS
    return rows, proc.stdout


@pytest.mark.timeout(900)
def test_smoke_rows_and_columns(smoke_run):
    rows, stdout = smoke_run
    names = [c.name for c in bl.PUBLIC_CASES]
    assert [(r["case"], r["contender"]) for r in rows] == [(n, c) for n in names for c in bl.CONTENDERS]
    for r in rows:
        tol = bl.TOLERANCE[r["dtype"]]
        if r["contender"] == "deepspeed":
            assert r["status"] == "not available: needs a CUDA device"
            continue
        assert r["status"] == "ok", r
        assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and float(r["efficiency"]) > 0
        assert float(r["floor_ms"]) > 0 and int(r["floor_bytes"]) > 0
        assert math.isclose(float(r["efficiency"]), float(r["floor_ms"]) / float(r["ms"]), rel_tol=1e-3)
        if r["contender"] == "copy":
            # beside it, the copy of the case's floor bytes (the bound of the summary's "*")
            assert float(r["floor_copy_ms"]) > 0, r
            continue
        assert math.isnan(float(r["floor_copy_ms"])), r
        assert float(r["err"]) <= tol, r
        assert math.isclose(float(r["speedup"]), float(r["ms"]) / float(
            next(t for t in rows if t["case"] == r["case"] and t["contender"] == "tp_softmax")["ms"]),
            rel_tol=1e-3)
    tp = {r["case"]: r for r in rows if r["contender"] == "tp_softmax"}
    eager = {r["case"]: r for r in rows if r["contender"] == "eager"}
    for name in names:
        assert tp[name]["path"] == "torch (cpu)"
        assert int(tp[name]["nan_rows"]) == 0 and float(tp[name]["sum_err"]) < 1e-2
    # Causal prefill with left padding has query rows with no visible key: zeros for
    # tp_softmax, NaN for the plain torch composition.
    for name in ("bloom176b-prefill-tp2", "gpt-prefill-b8"):
        assert tp[name]["masked_rows"] == "zeros"
        assert eager[name]["masked_rows"] == "NaN" and int(eager[name]["nan_rows"]) > 0
    # The per-case summary is the last thing printed, one line per case.
    tail = stdout.strip().splitlines()
    summary = tail.index(next(line for line in tail if line.startswith("summary:")))
    body = "\n".join(tail[summary:])
    assert all(name in body for name in names)
    assert tail[-1].startswith("  deepspeed: not available")


def _summary_rows(copy_ms, floor_copy_ms, tp_ms, compile_ms, q=512):
    """One case's rows as the summary sees them: floor 1.0 ms (efficiency = 1 / ms)."""
    base = {"case": "c", "status": "ok", "path": "kernel (x)", "dtype": "fp32", "Q": q, "floor_ms": 1.0,
            "floor_copy_ms": float("nan"), "own_efficiency": "", "err": 1e-7, "masked_rows": "",
            "nan_rows": 0, "scaling": "", "note": ""}
    rows = [dict(base, contender="copy", ms=copy_ms, floor_copy_ms=floor_copy_ms),
            dict(base, contender="tp_softmax", ms=tp_ms),
            dict(base, contender="compile", ms=compile_ms)]
    for r in rows:
        r["efficiency"] = 1.0 / r["ms"]
    bench.add_speedups(rows)
    return rows


def test_targets_beyond_the_copy_of_the_floor_bytes_are_marked():
    # The floor's bytes copy in 1.08 ms; tp_softmax takes 1.25 ms, compile 1.5 ms. eff >= 0.90 needs
    # 1.11 ms (reachable); 1.5 x compile needs 1.0 ms, less than the copy took: beyond it.
    rows = _summary_rows(copy_ms=1.4, floor_copy_ms=1.08, tp_ms=1.25, compile_ms=1.5)
    assert bench.targets(rows) == ["eff<0.90", "compile<1.5x"]
    assert bench.beyond_copy(rows) == {"compile<1.5x": pytest.approx(1.0)}
    buf = io.StringIO()
    bench.print_summary(rows, out=buf)
    text = buf.getvalue()
    line = next(ln for ln in text.splitlines() if ln.startswith("c "))
    assert "MISS eff<0.90, compile<1.5x*" in line and " 0.93 " in line  # copy column: 1.0 / 1.08
    assert "c: compile<1.5x needs <= 1.0000 ms; the copy of the floor's bytes took 1.0800 ms" in text
    # A copy that moves the floor's bytes faster leaves both targets within reach: no mark.
    rows = _summary_rows(copy_ms=1.4, floor_copy_ms=0.95, tp_ms=1.25, compile_ms=1.5)
    assert bench.beyond_copy(rows) == {}
    buf = io.StringIO()
    bench.print_summary(rows, out=buf)
    assert "*" not in buf.getvalue().split("\n", 3)[3] and "beyond the copy" not in buf.getvalue()
    # Decode rows are held to 0.80; without the floor copy timed nothing is marked.
    rows = _summary_rows(copy_ms=1.4, floor_copy_ms=1.3, tp_ms=1.3, compile_ms=3.0, q=1)
    assert bench.beyond_copy(rows) == {"eff<0.80": pytest.approx(1.25)}
    rows = _summary_rows(copy_ms=1.4, floor_copy_ms=float("nan"), tp_ms=1.3, compile_ms=1.5)
    assert bench.beyond_copy(rows) == {}


@pytest.mark.timeout(900)
def test_smoke_torchrun_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(LAUNCH / "bench.py"), "--smoke", "--device", "cpu", "--out", str(tmp_path),
           "--only", "bloom176b-tp4,decode-b64-k4k", "--contenders", "copy,tp_softmax,eager"]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, rows = _read(tmp_path)
    by = {(r["case"], r["contender"]): r for r in rows}
    assert set(by) == {("decode-b64-k4k", c) for c in ("copy", "tp_softmax", "eager")} | {
        (n, c) for n in ("bloom176b-tp4@1rank", "bloom176b-tp4") for c in ("copy", "tp_softmax")}
    dec = by[("decode-b64-k4k", "tp_softmax")]
    assert dec["ranks"] == "2" and len(dec["ms_per_rank"].split(";")) == 2 and dec["status"] == "ok"
    full = by[("bloom176b-tp4@1rank", "tp_softmax")]
    shard = by[("bloom176b-tp4", "tp_softmax")]
    # Smoke shape: 3 heads x mp 4 = 12 heads, split over the 2 ranks.
    assert (full["ranks"], full["H_local"], full["H_total"]) == ("1", "12", "12")
    assert (shard["ranks"], shard["H_local"], shard["H_total"]) == ("2", "6", "12")
    assert math.isclose(float(shard["scaling"]), float(shard["ms"]) / (float(full["ms"]) / 2), rel_tol=1e-2)
    assert float(shard["err"]) <= bl.TOLERANCE["fp16"] and shard["masked_rows"] == "zeros"
    assert "bloom176b-tp4: slowest of 2 ranks" in proc.stdout


def test_deepspeed_arch_list_gives_plain_capabilities():
    # DeepSpeed 0.19.8 reads TORCH_CUDA_ARCH_LIST entries as MAJOR.MINOR[+PTX] only
    assert bl.deepspeed_arch_list("9.0a", [(9, 0)]) == "9.0"
    assert bl.deepspeed_arch_list("8.0 9.0a", [(9, 0), (8, 0), (9, 0)]) == "8.0;9.0"
    assert bl.deepspeed_arch_list("9.0", [(9, 0)]) is None
    assert bl.deepspeed_arch_list("8.0;9.0+PTX", [(9, 0)]) is None
    assert bl.deepspeed_arch_list("", [(9, 0)]) is None


def test_git_commit_marks_changed_trees(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("a\n")
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], check=True)
    head = subprocess.run(git[:3] + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert bench.git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("b\n")
    assert bench.git_commit(tmp_path) == head + "+changes"
    assert bench.git_commit(tmp_path / "missing") == "?"


def _drawn(draw):
    """Run ``draw`` with matplotlib's savefig replaced; return what the chart's axes held: title,
    bar hatches and scatter marks (x, y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}

    def fake_savefig(self, path, **kw):
        ax = self.axes[0]
        drawn["title"] = ax.get_title()
        drawn["hatches"] = [p.get_hatch() for p in ax.patches]
        drawn["marks"] = [tuple(map(float, xy)) for col in ax.collections for xy in col.get_offsets()]

    orig = plt.Figure.savefig
    plt.Figure.savefig = fake_savefig
    try:
        draw()
    finally:
        plt.Figure.savefig = orig
    return drawn


def test_chart_from_csv_redraws_and_marks_wrong_results(tmp_path):
    pytest.importorskip("matplotlib")
    fields = ["case", "contender", "status", "efficiency", "err"]
    rows = [
        {"case": "a", "contender": "tp_softmax", "status": "ok", "efficiency": "0.9", "err": "2e-4"},
        {"case": "a", "contender": "deepspeed", "status": "ok", "efficiency": "0.4", "err": "1.0"},
        {"case": "b", "contender": "tp_softmax", "status": "ok", "efficiency": "0.5", "err": "nan"},
    ]
    with open(tmp_path / "bench.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "bench_env.json").write_text(json.dumps({"device": "GPU X", "torch": "t", "date": "d",
                                                         "copy_bandwidth_GBps": 3000.0}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(LAUNCH / "bench.py"), "--chart-from", str(tmp_path / "bench.csv"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = out / "bench_efficiency.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = _drawn(lambda: bench.chart_from_csv(tmp_path / "bench.csv", tmp_path / "again"))
    assert "GPU X" in drawn["title"] and "3000 GB/s" in drawn["title"] and "wrong" in drawn["title"]
    assert drawn["hatches"].count("xx") == 1  # only deepspeed's wrong bar on case a
    assert drawn["marks"] == []  # no copy rows: no floor-bytes copy marks


def test_chart_marks_the_copy_of_the_floor_bytes(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for case, fc in (("a", 1.25), ("b", float("nan"))):
        rows.append({"case": case, "contender": "copy", "status": "ok", "efficiency": 0.5, "err": float("nan"),
                     "floor_ms": 1.0, "floor_copy_ms": fc})
        rows.append({"case": case, "contender": "tp_softmax", "status": "ok", "efficiency": 0.7, "err": 1e-4,
                     "floor_ms": 1.0, "floor_copy_ms": float("nan")})
    drawn = _drawn(lambda: bench.draw_chart(rows, tmp_path / "c.png", "t"))
    assert drawn["marks"] == [(0.0, pytest.approx(0.8))]  # case a: 1.0 / 1.25; case b has none


def test_rows_beyond_sixteen_slices_are_held_to_their_own_floor():
    # The two-read path's own floor reads the visible scores twice; staged long rows read them once.
    floor = bl.FloorBytes(scores_read=100, output_written=100, extras_read=10)
    assert bench.own_floor_bytes("kernel (two reads (streaming): cluster 16 x 512 threads)", floor) == 310
    assert bench.own_floor_bytes("kernel (one read (long rows): cluster 16 x 512 threads, 16 piece(s) ...)",
                                 floor) == 210
    assert bench.own_floor_bytes("kernel (one read (staged): 256 thread(s)/row x 8 chunk(s), cluster 16)",
                                 floor, 16 * 32 * 1024) is None
    # rows beyond 16 x 32 KiB that one cluster of wide blocks reads once: the floor itself
    assert bench.own_floor_bytes("kernel (one read (staged): 512 thread(s)/row x 8 chunk(s), cluster 16)",
                                 floor, 16 * 32 * 1024 + 2) == 210
    # Their target is 0.60 of that floor, not the decode / prefill efficiency.
    for own, reads, miss in ((0.65, "one read", []), (0.55, "two reads", ["own eff<0.60"])):
        rows = _summary_rows(copy_ms=1.0, floor_copy_ms=1.0, tp_ms=1.5, compile_ms=3.0, q=1)
        tp = next(r for r in rows if r["contender"] == "tp_softmax")
        tp["own_efficiency"] = own
        tp["path"] = f"kernel ({reads} ...)" if reads == "two reads" else "kernel (one read (long rows) ...)"
        assert bench.targets(rows) == miss
        buf = io.StringIO()
        bench.print_summary(rows, out=buf)
        line = next(ln for ln in buf.getvalue().splitlines() if ln.startswith("c "))
        assert f"(own floor, {reads}: {own:.2f})" in line, line
