"""What a short call costs besides its kernel: device time per call of the op, timed three ways.

    python3 scripts/call_overhead.py      (a CUDA GPU; docs/perf.md, "After v25")

- one CUDA event pair around each call, as launch/bench.py times (the stream held by a sleep
  kernel first, so that the host's launch overhead is not timed);
- 200 calls back to back between one pair of events;
- a CUDA graph of 50 calls.
A plain copy of the same bytes is timed the first two ways. The one-element add's first figure is
bound by the host (one event pair a call cannot hide launches that take longer than the add).
"""
import torch, tp_softmax, statistics
from tp_softmax import attention_softmax
dev = "cuda"
def ev(): return torch.cuda.Event(enable_timing=True)
cases = {
  "decode-b8-k64k": (torch.randn(8, 32, 1, 65536, device=dev).to(torch.bfloat16), {}),
  "decode-b8-k64k-b": (torch.randn(8, 32, 1, 65536, device=dev).to(torch.bfloat16), {}),
  "k32k-noclu": (torch.randn(8, 64, 1, 16384, device=dev).to(torch.bfloat16), {}),  # same bytes, one block a row
  "decode-b64": (torch.randn(64, 32, 1, 4096, device=dev).half(), dict(alibi=torch.randn(64, 128, 1, 4096, device=dev).half(), head_offset=32, mask=torch.zeros(64, 1, 1, 4096, device=dev).half())),
}
small = torch.zeros(1, device=dev)
def per_call(fn, n=200):
    s = [ev() for _ in range(n)]; e = [ev() for _ in range(n)]
    torch.cuda.synchronize(); torch.cuda._sleep(50_000_000)
    for i in range(n):
        s[i].record(); fn(); e[i].record()
    torch.cuda.synchronize()
    return statistics.median([a.elapsed_time(b) * 1e3 for a, b in zip(s, e)])
def batched(fn, n=200):
    a, b = ev(), ev()
    torch.cuda.synchronize(); torch.cuda._sleep(50_000_000)
    a.record()
    for i in range(n): fn()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / n
def graphed(fn, n=50):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for i in range(n): fn()
    g.replay(); torch.cuda.synchronize()
    a, b = ev(), ev()
    a.record(); g.replay(); b.record(); torch.cuda.synchronize()
    a.record(); g.replay(); b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / n
print("empty add: per-call %.2f us, batched %.2f us" % (per_call(lambda: small.add_(1)), batched(lambda: small.add_(1))))
for name, (x, kw) in cases.items():
    out = torch.empty_like(x)
    fn = lambda: attention_softmax(x, **kw)
    for _ in range(20): fn()
    print("%-18s per-call %.2f us, batched %.2f us, graph %.2f us" % (name, per_call(fn), batched(fn), graphed(fn)))
    xc = x.clone()
    print("%-18s copy: per-call %.2f us, batched %.2f us" % (name, per_call(lambda: out.copy_(xc)), batched(lambda: out.copy_(xc))))
