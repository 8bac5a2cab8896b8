"""MLX's distributed runtime, as both stages use it: `mlx.launch -n N ...` starts N ranks; a plain
run is one rank and every call here is then a no-op."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


def world():
    """The global group (size 1 unless started by mlx.launch)."""
    return mx.distributed.init()


def barrier(group) -> None:
    """Wait for every rank: an all-reduce completes only when all have joined it."""
    if group is not None and group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def all_sum(values: mx.array, group) -> mx.array:
    if group is None or group.size() == 1:
        return values
    return mx.distributed.all_sum(values, group=group, stream=mx.cpu)


def all_sum_tree(tree, group):
    """Every array of a tree summed over ranks, in one all-reduce (leaves flattened and concatenated)."""
    if group is None or group.size() == 1:
        return tree
    leaves = tree_flatten(tree)
    flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in leaves])
    flat = mx.distributed.all_sum(flat, group=group, stream=mx.cpu)
    bounds = np.cumsum([0] + [v.size for _, v in leaves]).tolist()
    return tree_unflatten([(k, flat[a:b].reshape(v.shape).astype(v.dtype))
                           for (k, v), a, b in zip(leaves, bounds, bounds[1:])])


def all_gather_indices(indices: list[int], group) -> list[int]:
    """Every rank's list of row indices, rank 0's first (lists padded with -1 to the longest)."""
    if group is None or group.size() == 1:
        return list(indices)
    longest = all_max(len(indices), group)
    if longest == 0:
        return []
    padded = mx.array(list(indices) + [-1] * (longest - len(indices)), dtype=mx.int32)
    gathered = mx.distributed.all_gather(padded, group=group, stream=mx.cpu)
    return [int(i) for i in gathered.tolist() if i >= 0]


def all_max(value: int, group) -> int:
    sizes = mx.zeros(group.size(), dtype=mx.int32)
    sizes[group.rank()] = value
    return int(mx.distributed.all_sum(sizes, group=group, stream=mx.cpu).max().item())
