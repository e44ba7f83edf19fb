"""optaxclip on 8 devices: jit over a mesh, shard_map and pmap give the single-device
answer, decisions agree across devices, and only scalars are communicated.

JAX fixes the device count when it initialises, and this pytest process already has one
device, so the checks run once, in a subprocess with 8 simulated CPU devices
(``tests/multidevice_checks.py``, which documents each check); each test below asserts
on one entry of the JSON report it prints. Under pytest-xdist the workers share one run.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import pytest
from _devices import assert_check_ok, run_json_script, shared_across_xdist_workers
from multidevice_checks import GPU_LAYOUT_TRANSFORMS, PMAP_TRANSFORMS

import optaxclip
from optaxclip._catalog import NAMES

# Its tests share one module fixture (a subprocess run): pytest-xdist's loadgroup
# sends them to one worker, which runs it once while the other worker goes on.
pytestmark = pytest.mark.xdist_group("multidevice")

SCRIPT = pathlib.Path(__file__).with_name("multidevice_checks.py")
TIMEOUT_S = 900  # a guard against hangs; the checks take about a minute on 2 cores

ALL_TRANSFORMS = NAMES


def _run_checks() -> dict:
    return run_json_script([str(SCRIPT)], devices=8, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return shared_across_xdist_workers(tmp_path_factory, "multidevice", _run_checks, TIMEOUT_S)


@pytest.mark.parametrize("transform", ALL_TRANSFORMS)
def test_jit_over_a_2x4_mesh_matches_one_device(report, transform):
    # FSDP- and tensor-parallel-sharded gradients, several steps (adaptive states
    # exercised): updates, statistics and state equal the single-device run, and the
    # updates keep the parameters' shardings.
    assert_check_ok(report, f"mesh_jit/{transform}")


@pytest.mark.parametrize("transform", ALL_TRANSFORMS)
def test_shard_map_with_axis_name_matches_one_device(report, transform):
    # Leaves split along different axes, others replicated; statistics and adaptive
    # state declared replicated, which shard_map(check_vma=True) verifies.
    assert_check_ok(report, f"shard_map/{transform}")


def test_shard_map_without_axis_name_each_shard_uses_its_own_norm(report):
    # The control: without axis_name the answer is per-shard and differs.
    assert_check_ok(report, "shard_map/without_axis_name_each_shard_uses_its_own_norm")


@pytest.mark.parametrize(
    "check", ["block_norms_rescue_leaf_by_leaf", "gpu_layout/block_norms_rescue"]
)
def test_shard_map_block_norms_rescue_each_leaf_as_in_float64(report, check):
    # A sharded and a replicated leaf whose squares all flush to zero in float32, beside
    # a sharded leaf whose squares overflow: every leaf's norm and the global norm are
    # float64's. Also in the layout a GPU target gets (sums at three scales, no branch).
    assert_check_ok(report, f"shard_map/{check}")


@pytest.mark.parametrize("transform", GPU_LAYOUT_TRANSFORMS)
def test_shard_map_in_the_gpu_layout_matches_one_device(report, transform):
    # The GPU layout psums each sharded leaf's three sums (plain, scaled down, scaled
    # up) in one collective and keeps the replicated leaves' out of it (check_vma).
    assert_check_ok(report, f"shard_map/gpu_layout/{transform}")


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_shard_map_spike_aware_clip_in_its_norm_first_layout_matches_one_device(
    report, platform
):
    # The TPU and GPU layouts take the norm first, sum the clipped values at three
    # scales and psum them with the sharding flags, where the CPU layout (run above)
    # has a rescue branch.
    assert_check_ok(report, f"shard_map/spike_aware_clip_{platform}_layout")


@pytest.mark.parametrize("transform", ["clip_by_global_norm", "clip_by_block_norm"])
def test_gradient_through_a_clip_under_shard_map_matches_float64(report, transform):
    # jax.grad of a loss of the clipped gradient inside shard_map (sharded and replicated
    # leaves; the CPU, TPU and GPU layouts), against float64: the norm's derivative rule
    # psums the sharded leaves' <x / ||x||, dx>, and the norm's part of the gradient
    # survives where it flushed to zero through the sums of squares.
    assert_check_ok(report, f"shard_map/gradient/{transform}")


def test_shard_map_tuple_axis_name_over_a_2x4_mesh(report):
    assert_check_ok(report, "shard_map/tuple_axis_name_over_a_2x4_mesh")


@pytest.mark.parametrize("transform", PMAP_TRANSFORMS)
def test_pmap_with_axis_name_matches_one_device(report, transform):
    # Outputs not tied to a split leaf must also be equal on all 8 devices.
    assert_check_ok(report, f"pmap/{transform}")


def test_nan_on_one_shard_skips_on_every_device_under_jit(report):
    assert_check_ok(report, "mesh_jit/nan_on_one_shard_skips_everywhere")


def test_nan_on_one_shard_skips_on_every_device_under_shard_map(report):
    # And without axis_name only the device holding the NaN would skip.
    assert_check_ok(report, "shard_map/nan_on_one_shard_skips_on_every_device")


@pytest.mark.parametrize("placement", ["", "replicated/"], ids=["sharded", "replicated"])
@pytest.mark.parametrize(
    "layout", ["", "tpu_layout/", "gpu_layout/"], ids=["cpu_layout", "tpu_layout", "gpu_layout"]
)
@pytest.mark.parametrize("case", ["ordinary", "overflow", "underflow", "one_huge_leaf"])
def test_global_norm_of_sharded_leaves_is_rescued_as_in_float64(report, layout, placement, case):
    # Under jit over a mesh the global transforms measure through their own rescue (the
    # total added from the leaves' sums, one all-reduce): squares beyond float32 and
    # below its smallest normal number, one leaf's overflow among ordinary ones, and
    # ordinary values (the common path). In the layout a TPU target gets too (each leaf
    # reduced on its own, the sums added in order) and a GPU target's (each leaf summed
    # at three scales, no branch), and with every leaf placed replicated on the mesh.
    assert_check_ok(report, f"mesh_rescue/{layout}{placement}{case}")


def test_sharded_clip_by_global_norm_step_all_reduces_scalars_only(report):
    # The compiled program has no all-gather (or other gradient-sized collective), and
    # its all-reduces carry at most one scalar per leaf.
    assert_check_ok(report, "hlo/clip_by_global_norm_all_reduces_scalars_only")


# In-process checks of the arguments (no devices needed).


def test_agc_axis_name_and_sharded_axis_come_together():
    with pytest.raises(ValueError, match="sharded_axis"):
        optaxclip.adaptive_grad_clip(0.1, axis_name="x")
    with pytest.raises(ValueError, match="axis_name"):
        optaxclip.adaptive_grad_clip(0.1, sharded_axis=0)


def test_agc_sharded_axis_rejects_bools_and_out_of_range_axes_naming_the_leaf():
    with pytest.raises(TypeError, match="sharded_axis"):
        optaxclip.adaptive_grad_clip(0.1, axis_name="x", sharded_axis=True)
    tx = optaxclip.adaptive_grad_clip(0.1, axis_name="x", sharded_axis={"w": 2, "b": None})
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"sharded_axis \['w'\] is 2"):
        tx.update(params, tx.init(params), params)
