"""The recipe search's grid and ranking (its end-to-end run at tiny size is part of tests/test_bench.py)."""

import pytest
import torch

from i2i_unlearning.bench.recipe_search import grid_points, ranked
from i2i_unlearning.errors import ConfigError


def test_grid_points_are_every_combination_and_only_method_keys():
    assert grid_points({"method.alpha": [0.5, 1.0], "method.lr": [1e-3]}) == [
        ["method.alpha=0.5", "method.lr=0.001"], ["method.alpha=1.0", "method.lr=0.001"]]
    with pytest.raises(ConfigError, match="bench.search.grid.model.depth"):
        grid_points({"model.depth": [1]})
    with pytest.raises(ConfigError, match="non-empty list"):
        grid_points({"method.alpha": []})


def test_ranked_puts_met_points_first_by_steps_then_retain_margin():
    rows = [{"criterion_met": False, "steps": 5, "retain_fid": 1.0, "id": 0},
            {"criterion_met": True, "steps": 30, "retain_fid": 1.0, "id": 1},
            {"criterion_met": True, "steps": 10, "retain_fid": 40.0, "id": 2},
            {"criterion_met": True, "steps": 10, "retain_fid": 35.0, "id": 3}]
    assert [r["id"] for r in ranked(rows)] == [3, 2, 1, 0]


def test_the_bench_recipe_sets_method_keys_and_names_an_unknown_one():
    from i2i_unlearning.bench.main import compose_cfg
    from i2i_unlearning.bench.unlearn_vs_retrain import unlearning_method

    plain = unlearning_method(compose_cfg(["model=mae"]))  # null recipe keys: the family's own ours config
    tuned = unlearning_method(compose_cfg(["model=mae", "bench.unlearn.method.alpha=0.25"]))
    assert (tuned.alpha, tuned.lr) == (0.25, plain.lr) and plain.alpha != 0.25
    fast = unlearning_method(compose_cfg(["model=mae", "bench.unlearn.method.lr=0.125"]))
    param = [torch.nn.Parameter(torch.zeros(1))]
    assert fast.lr == 0.125 and fast.optimizer(param).defaults["lr"] == 0.125  # the optimizer follows method.lr
    assert plain.optimizer(param).defaults["lr"] == plain.lr != 0.125
    with pytest.raises(ConfigError, match="bench.unlearn.method.alpah: method ours has no such key"):
        unlearning_method(compose_cfg(["model=mae", "++bench.unlearn.method.alpah=0.25"]))
