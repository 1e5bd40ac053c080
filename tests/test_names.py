"""Names are not paths: a name or seed that becomes a path component is checked before any directory is made."""

import pytest
from conftest import compose_cfg, tiny_overrides

from i2i_unlearning import cli
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.names import check_name
from i2i_unlearning.report.tables import group_label

BAD = [("model.name", "/../../x"), ("seed", "/../../x"), ("data.name", ".."), ("method.name", "a/b"),
       ("data.name", "../up"), ("method.name", ""), ("model.name", "x..y"), ("seed", "-1"), ("seed", "1.5"),
       ("+data.source.name", "../../src")]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_a_bad_name_fails_naming_the_key_before_any_directory(tmp_path, monkeypatch, key, value):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(tiny_overrides(tmp_path / "out", extra=[f"{key}='{value}'"]))
    with pytest.raises(ConfigError, match=f"^{key.lstrip('+')}="):
        cli.main(cfg)
    assert list(tmp_path.rglob("*")) == []  # not even the output dir


@pytest.mark.parametrize("name", ["mae", "fashion_mnist", "max_loss", "ours-a=0.5,b+1", "ImageNet.100", "0"])
def test_usual_names_pass(name):
    assert check_name(name, "model.name") == name


def test_report_file_labels_from_metrics_json_stay_in_the_out_dir():
    label = group_label(("../../etc", "/abs", "t"), [("../../etc", "/abs", "t")])
    assert "/" not in label and ".." not in label and not label.startswith(".")
