"""Type stability: every transform's state keeps its shapes and dtypes across steps, with
float32, bfloat16 and mixed parameter trees, so a jitted train step traces once."""

import jax
import numpy as np
import pytest
from _transforms import NAMES, TRACES, TREES, linear_batches, linear_params, train_step

X, Y = linear_batches(2)


def _avals(tree):
    """(structure, [(shape, dtype, weak_type) per leaf]) of a pytree of arrays."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(a.shape, a.dtype, a.weak_type) for a in map(jax.typeof, leaves)]


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("name", NAMES)
def test_state_keeps_its_types_and_the_step_never_retraces(name, tree):
    tx, step = train_step(name)
    params = linear_params(tree)
    state = tx.init(params)  # built outside jit, as a training script does

    before = TRACES[name]
    params1, state1 = step(params, state, X[0], Y[0])
    first = TRACES[name]
    params2, state2 = step(params1, state1, X[1], Y[1])
    assert TRACES[name] == first <= before + 1  # the second step reuses the first trace

    assert _avals(state1) == _avals(state)
    assert _avals(state2) == _avals(state)
    assert _avals(params2) == _avals(params)
    assert all(np.all(np.isfinite(np.asarray(p, np.float32))) for p in jax.tree.leaves(params2))
