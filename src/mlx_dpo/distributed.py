"""MLX's distributed runtime, as both stages use it: `mlx.launch -n N ...` starts N ranks; a plain
run is one rank and every call here is then a no-op."""

import mlx.core as mx


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
