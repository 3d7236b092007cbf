"""What a bench run measured: counts, latency percentiles, throughput, the generator's own lag."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from modelport.bench.run import Run

BEHIND_MS = 5.0  # p99 schedule error above this: the generator, not the server, is the limit


@dataclass
class Summary:
    mode: str
    offered_per_s: float | None
    concurrency: int | None
    duration_s: float
    sent: int
    ok: int
    wrong: int
    errors: dict[str, int]
    unsent: int
    sent_per_s: float  # what was actually offered (Poisson arrivals vary around the rate)
    throughput_per_s: float  # answers (right or wrong) per second
    good_per_s: float  # right answers per second
    latency_ms: dict[str, float | None]  # p50 p90 p99 p99.9 max, over answered requests
    schedule_error_ms: dict[str, float] | None  # open loop: how late requests left
    behind: bool
    server: dict[str, float] | None = None  # modelport's own: mean batch size, mean queue ms
    limit_per_s: float | None = None
    over_time: list[tuple[float, float]] = field(default_factory=list)  # (planned s, latency ms), for plots
    error_latency_ms: dict[str, float | None] = field(default_factory=dict)  # p50 p99 max, over errors

    def as_dict(self, with_samples: bool = False) -> dict:
        data = asdict(self)
        if not with_samples:
            data.pop("over_time")
        return data


def summarise(run: Run, expected: Sequence[tuple[int | None, str | None]] | None = None) -> Summary:
    ok = wrong = 0
    errors: dict[str, int] = {}
    answered = []
    failed = []
    for sample in run.samples:
        if sample.error is not None:
            errors[sample.error] = errors.get(sample.error, 0) + 1
            failed.append(sample.latency_s * 1000)
            continue
        answered.append(sample)
        if expected is not None and not _matches(sample.answer, expected[sample.image]):
            wrong += 1
        else:
            ok += 1
    latencies = np.array([s.latency_s for s in answered]) * 1000
    window = run.duration_s if run.mode == "closed" else max([s.done for s in run.samples] + [run.duration_s])
    lag = np.array([s.sent - s.planned for s in run.samples]) * 1000 if run.mode == "open" else None
    schedule = _percentiles(lag, ("p50", "p99", "max")) if lag is not None and len(lag) else None
    return Summary(run.mode, run.offered, run.concurrency, run.duration_s, len(run.samples), ok, wrong, errors,
                   run.unsent, len(run.samples) / run.duration_s, len(answered) / window, ok / window,
                   _percentiles(latencies),
                   schedule, bool(run.unsent) or (schedule is not None and schedule["p99"] > BEHIND_MS),
                   over_time=[(round(s.planned, 4), round(s.latency_s * 1000, 3)) for s in answered],
                   error_latency_ms=_percentiles(np.array(failed), ("p50", "p99", "max")))


def _matches(answer, expected: tuple[int | None, str | None]) -> bool:
    index, label = expected
    if answer.index is not None and index is not None:
        return answer.index == index
    return answer.label == label


def _percentiles(values, names=("p50", "p90", "p99", "p99.9", "max")) -> dict[str, float]:
    if values is None or not len(values):
        return {name: None for name in names}  # nothing answered: no latency (and JSON has no NaN)
    out = {}
    for name in names:
        q = 100.0 if name == "max" else float(name[1:])
        out[name] = round(float(np.percentile(values, q, method="higher")), 3)
    return out


def plot(summaries: Sequence[Summary], path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from modelport.errors import MissingExtra

        raise MissingExtra("--plot needs matplotlib: pip install 'modelport[plot]'") from None
    if len(summaries) == 1:  # one rate: latency over the run
        s = summaries[0]
        figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
        times = [t for t, _ in s.over_time]
        axis.scatter(times, [ms for _, ms in s.over_time], s=3, alpha=0.5)
        axis.set_xlabel("planned send time (s)")
        axis.set_ylabel("latency from planned send (ms)")
        axis.set_yscale("log")
        what = f"{s.offered_per_s:g} req/s offered" if s.mode == "open" else f"{s.concurrency} in flight"
        axis.set_title(f"{title}: {what}, p99 {_nan(s.latency_ms['p99']):.1f} ms")
    else:  # a sweep: latency and throughput against offered load
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
        x = [s.offered_per_s if s.mode == "open" else s.concurrency for s in summaries]
        for name in ("p50", "p90", "p99", "p99.9"):
            left.plot(x, [_nan(s.latency_ms[name]) for s in summaries], marker="o", markersize=3, label=name)
        left.set_yscale("log")
        left.set_ylabel("latency (ms)")
        right.plot(x, [s.good_per_s for s in summaries], marker="o", markersize=3, label="right answers / s")
        right.plot(x, [s.throughput_per_s for s in summaries], linestyle=":", label="answers / s")
        if summaries[0].mode == "open":
            right.plot(x, [s.sent_per_s for s in summaries], color="grey", linewidth=0.8, linestyle="--",
                       label="sent / s")
        if summaries[0].limit_per_s:
            right.axhline(summaries[0].limit_per_s, color="tab:red", linestyle=":", label="in-process limit")
        for axis in (left, right):
            axis.set_xlabel("offered load (req/s)" if summaries[0].mode == "open" else "requests in flight")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        right.set_ylabel("per second")
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value
