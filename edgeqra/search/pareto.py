"""NSGA-II ranking (Deb et al. 2002): non-dominated sorting, crowding distance, 2-D hypervolume.

All objectives are *minimised*; the search passes ``(-score, memory_bytes)``. nevergrad keeps
a Pareto front of what it was told (``optimizer.pareto_front()``), but it neither ranks a
population into fronts nor gives crowding distances, and NSGA-II survivor selection needs
both: these few lines are that selection (checked against hand-computed fronts in tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["crowding_distance", "dominates", "hypervolume_2d", "non_dominated_sort", "select"]

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in at least one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def non_dominated_sort(points: Sequence[Point]) -> list[list[int]]:
    """Fronts of indices: front 0 is non-dominated, front 1 is dominated only by front 0, …

    The O(M N^2) fast sort of Deb et al.; N is a population (tens), so this is cheap.
    """
    n = len(points)
    dominated_by: list[list[int]] = [[] for _ in range(n)]  # i dominates these
    count = [0] * n  # how many points dominate i
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                dominated_by[i].append(j)
                count[j] += 1
            elif dominates(points[j], points[i]):
                dominated_by[j].append(i)
                count[i] += 1
    fronts: list[list[int]] = []
    current = [i for i in range(n) if count[i] == 0]
    while current:
        fronts.append(current)
        following = []
        for i in current:
            for j in dominated_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    following.append(j)
        current = sorted(following)
    return fronts


def crowding_distance(points: Sequence[Point], front: Sequence[int]) -> dict[int, float]:
    """Per index of ``front``: the sum over objectives of the normalised gap between neighbours.

    Boundary points get infinity so that the extremes of the front always survive.
    """
    distance = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: math.inf for i in front}
    for m in range(len(points[front[0]])):
        ordered = sorted(front, key=lambda i: (points[i][m], i))
        low, high = points[ordered[0]][m], points[ordered[-1]][m]
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        if high == low:
            continue
        for k in range(1, len(ordered) - 1):
            gap = points[ordered[k + 1]][m] - points[ordered[k - 1]][m]
            distance[ordered[k]] += gap / (high - low)
    return distance


def select(points: Sequence[Point], k: int) -> list[int]:
    """NSGA-II survivors: whole fronts in rank order, the last one cut by crowding distance."""
    chosen: list[int] = []
    for front in non_dominated_sort(points):
        if len(chosen) + len(front) <= k:
            chosen.extend(front)
            continue
        crowd = crowding_distance(points, front)
        chosen.extend(sorted(front, key=lambda i: (-crowd[i], i))[: k - len(chosen)])
        break
    return chosen


def hypervolume_2d(points: Sequence[Point], reference: Point) -> float:
    """Area dominated by ``points`` and bounded by ``reference`` (both objectives minimised).

    Points not strictly better than the reference in both objectives add nothing.
    """
    inside = sorted((p[0], p[1]) for p in points if p[0] < reference[0] and p[1] < reference[1])
    area, best_y = 0.0, reference[1]
    for x, y in inside:  # sweep by the first objective; keep the lowest second so far
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area
