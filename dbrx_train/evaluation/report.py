"""The metrics of an evaluation as a table, one row per evaluator and metric."""

from __future__ import annotations

PREFIX = 'metrics/'


def metrics_table(metrics: dict[str, float], title: str) -> str:
    """`metrics/<evaluator>/<metric>` keys (evaluator labels may hold '/') as aligned columns."""
    rows = [(*key.removeprefix(PREFIX).rsplit('/', 1), f'{value:.4f}') for key, value in sorted(metrics.items())]
    header = ('task / stream', 'metric', 'value')
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    rule = tuple('-' * width for width in widths)
    lines = [f'{label.ljust(widths[0])}  {metric.ljust(widths[1])}  {value.rjust(widths[2])}'
             for label, metric, value in [header, rule, *rows]]
    return '\n'.join([title, *lines])
