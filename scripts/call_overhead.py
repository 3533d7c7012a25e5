"""What a short call costs besides its kernel: device time per call of the op, timed three ways.

    python3 scripts/call_overhead.py      (a CUDA GPU; docs/perf.md, "After v25")

- one CUDA event pair around each call, as launch/bench.py times (the stream held by a sleep
  kernel first, so that the host's launch overhead is not timed);
- 200 calls back to back between one pair of events;
- a CUDA graph of 50 calls.
A plain copy of the same bytes is timed the first two ways. Each case runs on one input set (no
rotation). The one-element add's first figure is bound by the host: one event pair a call cannot
hide launches that take longer than the add.
"""

import statistics

import torch

from tp_softmax import attention_softmax

DEV = "cuda"


def _event():
    return torch.cuda.Event(enable_timing=True)


def per_call(fn, n=200):
    """Median device time (us) between an event pair around each of n calls."""
    starts, ends = [_event() for _ in range(n)], [_event() for _ in range(n)]
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def back_to_back(fn, n=200):
    """Device time (us) a call of n calls between one event pair."""
    start, end = _event(), _event()
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def graphed(fn, n=50):
    """Device time (us) a call of a CUDA graph of n calls (its second replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = _event(), _event()
    for _ in range(2):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def main():
    bf16, fp16 = torch.bfloat16, torch.float16
    cases = {
        "decode-b8-k64k": (torch.randn(8, 32, 1, 65536, device=DEV).to(bf16), {}),
        "decode-b8-k64k-b": (torch.randn(8, 32, 1, 65536, device=DEV).to(bf16), {}),  # a second input
        # half decode-b8-k64k's bytes, rows of one block (no cluster)
        "k32k-noclu": (torch.randn(8, 64, 1, 16384, device=DEV).to(bf16), {}),
        "decode-b64": (
            torch.randn(64, 32, 1, 4096, device=DEV).to(fp16),
            dict(alibi=torch.randn(64, 128, 1, 4096, device=DEV).to(fp16), head_offset=32,
                 mask=torch.zeros(64, 1, 1, 4096, device=DEV).to(fp16)),
        ),
    }
    one = torch.zeros(1, device=DEV)
    add = lambda: one.add_(1)  # noqa: E731
    print("empty add: per-call %.2f us, batched %.2f us" % (per_call(add), back_to_back(add)))
    for name, (x, kwargs) in cases.items():
        op = lambda: attention_softmax(x, **kwargs)  # noqa: E731
        for _ in range(20):
            op()
        print("%-18s per-call %.2f us, batched %.2f us, graph %.2f us" % (name, per_call(op), back_to_back(op),
                                                                         graphed(op)))
        src, dst = x.clone(), torch.empty_like(x)
        copy = lambda: dst.copy_(src)  # noqa: E731
        print("%-18s copy: per-call %.2f us, batched %.2f us" % (name, per_call(copy), back_to_back(copy)))


if __name__ == "__main__":
    main()
