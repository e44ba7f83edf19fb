"""Type stability: every transform's state keeps its shapes and dtypes across steps, with
float32, bfloat16 and mixed parameter trees, so a jitted train step traces once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _transforms import BY_NAME as _BY_NAME
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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", NAMES)
def test_derivatives_through_half_precision_leaves_keep_their_dtype(name, dtype):
    # jax.jvp and jax.grad of one update with respect to the gradient, on the bfloat16
    # and float16 tree, against the same derivative taken on its float32 copy (whose
    # values test_global.py and the others check against float64): the custom rules
    # must give tangents in the leaves' own dtype, which JAX checks. The gradient is
    # large enough for every transform's first step to clip where it can.
    tx = _BY_NAME[name].build(inner=optax.sgd(0.1))
    params32 = linear_params("float32")
    grads32 = jax.tree.map(lambda p: 40.0 * p + 1.0, params32)

    def derivatives(cast):
        params, grads = jax.tree.map(cast, params32), jax.tree.map(cast, grads32)
        state = tx.init(params)
        update = lambda g: tx.update(g, state, params)[0]  # noqa: E731
        ones = jax.tree.map(jnp.ones_like, grads)
        _, tangent = jax.jvp(update, (grads,), (ones,))
        total = lambda g: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(update(g)))  # noqa: E731
        return tangent, jax.grad(total)(grads)

    half = derivatives(lambda x: x.astype(dtype))
    wide = derivatives(lambda x: x)
    for got, want in zip(jax.tree.leaves(half), jax.tree.leaves(wide), strict=True):
        assert got.dtype == jnp.dtype(dtype)
        # One rounding of the inputs and of each result to 8 (11) significant bits.
        np.testing.assert_allclose(
            np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=0.05, atol=0.02
        )
