"""Where a profiled run leaves the device idle.

The kernel list of a batch-8 fast-mode image adds up to 1.98 s of its 2.33 s (run 11); this finds the
rest. Each stage of the profiled run is a record_function range that synchronises the device at both
ends (gpu_bench's `stage`), so every kernel of a stage runs inside its range: the stage's device-busy
time is the union of its device events' intervals, and the remainder is time the device waited for the
host. The largest gaps name the kernels on either side (a gap before a step's first kernel is the host
between steps).
"""

from torch.autograd import DeviceType


def merged(intervals):
    """(start, end, name) events -> their union as busy periods [start, end, name of the event that
    opened it, name of the one that ended it], in time order."""
    periods = []
    for start, end, name in sorted(intervals):
        if periods and start <= periods[-1][1]:
            last = periods[-1]
            if end > last[1]:
                last[1], last[3] = end, name
        else:
            periods.append([start, end, name, name])
    return periods


def window_summary(intervals, start, end, top_gaps=5, top_kernels=8):
    """Busy and idle time of the device inside [start, end] (µs in, ms out), its largest idle gaps and
    the events that took the most time in it (ms and calls per name)."""
    inside = [(max(s, start), min(e, end), n) for s, e, n in intervals if e > start and s < end]
    by_name = {}
    for s, e, n in inside:
        ms, calls = by_name.get(n, (0.0, 0))
        by_name[n] = (ms + (e - s) / 1e3, calls + 1)
    kernels = sorted(by_name.items(), key=lambda item: -item[1][0])[:top_kernels]
    periods = merged(inside)
    busy = sum(e - s for s, e, _, _ in periods)
    edges = [(start, start, "(stage start)", "(stage start)"), *periods, (end, end, "(stage end)", "(stage end)")]
    gaps = sorted((dict(ms=(b[0] - a[1]) / 1e3, after=a[3], before=b[2]) for a, b in zip(edges, edges[1:])
                   if b[0] > a[1]), key=lambda g: -g["ms"])
    wall = (end - start) / 1e3
    return dict(wall_ms=wall, busy_ms=busy / 1e3, idle_ms=wall - busy / 1e3,
                idle_in_gaps_over_1ms=sum(g["ms"] for g in gaps if g["ms"] > 1),
                gaps_over_1ms=sum(g["ms"] > 1 for g in gaps),
                largest_gaps=[dict(g, ms=round(g["ms"], 3), after=g["after"][:80], before=g["before"][:80])
                              for g in gaps[:top_gaps]],
                top_kernels=[dict(name=n[:100], ms=round(ms, 3), calls=calls) for n, (ms, calls) in kernels])


def host_ops(events, start, end, top=6):
    """The host operators that started inside [start, end] (µs), by self time: what kept the host busy while
    the device waited (ms and calls per name)."""
    by_name = {}
    for name, begin, self_us in events:
        if start <= begin < end:
            ms, calls = by_name.get(name, (0.0, 0))
            by_name[name] = (ms + self_us / 1e3, calls + 1)
    return [dict(name=n[:100], ms=round(ms, 3), calls=calls)
            for n, (ms, calls) in sorted(by_name.items(), key=lambda item: -item[1][0])[:top]]


def stage_timeline(events, stages, device_type=DeviceType.CUDA, top_gaps=5, top_kernels=8):
    """Per stage name (a record_function range among the profiler's `events`), and for "all stages" (the
    first stage's start to the last one's end): window_summary of the `device_type` events inside it (on
    the CPU, the CPU operators: only the code path is meaningful) and the host's busiest operators."""
    found = {e.name: (e.time_range.start, e.time_range.end) for e in events
             if e.name in stages and e.device_type == DeviceType.CPU}
    ranges = {name: found[name] for name in stages if name in found}
    host = [(e.name, e.time_range.start, e.self_cpu_time_total) for e in events
            if e.device_type == DeviceType.CPU and e.name not in stages]
    # kernels, copies and memsets; not the annotations (record_function and the compiler's ranges) that the
    # profiler also draws on the device's timeline, spanning the kernels and the gaps between them
    device = [(e.time_range.start, e.time_range.end, e.name) for e in events
              if e.device_type == device_type and e.name not in stages and not getattr(e, "is_user_annotation", False)
              and "annotation" not in str(getattr(e, "activity_type", ""))]
    if ranges:  # the stages together, the host's work between them included
        ranges["all stages"] = min(s for s, _ in ranges.values()), max(e for _, e in ranges.values())
    return {name: dict(window_summary(device, *window, top_gaps, top_kernels), host_ops=host_ops(host, *window))
            for name, window in ranges.items()}
