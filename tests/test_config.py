"""Config validation: every bad value is one clear line naming the field and what is allowed."""

import pytest

from tinyfed.config import Config, build_config, load_config, parse_set
from tinyfed.errors import ConfigError


def test_defaults_match_the_issue():
    c = Config()
    assert (c.dataset, c.model, c.clients, c.partition) == ("fmnist", "mlp", 10, "iid")
    assert (c.fraction, c.epochs, c.batch_size, c.rounds) == (1.0, 1, 10, 5)


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"fraction": 0}, "'fraction' = 0"),
        ({"fraction": 1.5}, "'fraction' = 1.5"),
        ({"clients": 0}, "'clients' = 0"),
        ({"epochs": -1}, "'epochs'"),
        ({"batch_size": -5}, "'batch_size'"),
        ({"alpha": 0}, "'alpha' = 0"),
        ({"lr": 0}, "'lr'"),
        ({"dataset": "imagenet"}, "'dataset' = 'imagenet'"),
        ({"partition": "random"}, "'partition'"),
        ({"model": "resnet"}, "'model' = 'resnet'"),
        ({"rounds": "five"}, "'rounds' = 'five'"),
        ({"colour": "red"}, "unknown config key 'colour'"),
        ({"min_clients": 20, "clients": 10}, "min_clients (20) exceeds clients (10)"),
        ({"dataset": "cifar10", "model": "mlp"}, "cifar_cnn"),
    ],
)
def test_bad_values_name_the_field(values, needle):
    with pytest.raises(ConfigError) as err:
        build_config(values)
    msg = str(err.value)
    assert needle in msg
    assert "\n" not in msg


def test_clients_per_round_never_zero():
    assert build_config({"clients": 100, "fraction": 0.001}).clients_per_round == 1
    assert build_config({"clients": 100, "fraction": 0.1}).clients_per_round == 10
    assert build_config({"clients": 5, "fraction": 1.0}).clients_per_round == 5


def test_toml_round_trip_and_overrides(tmp_path):
    c = build_config({"clients": 7, "lr": 0.2, "target_accuracy": 0.9})
    path = tmp_path / "c.toml"
    path.write_text(c.to_toml())
    assert load_config(path) == c
    assert load_config(path, {"clients": 9}).clients == 9


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("clients = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    typed = tmp_path / "typed.toml"
    typed.write_text('clients = "many"\n')
    with pytest.raises(ConfigError, match="'clients' = 'many'"):
        load_config(typed)


def test_parse_set_reads_toml_values():
    assert parse_set(["lr=0.5", "deterministic=true", "dataset=mnist", 'model="cnn"']) == {
        "lr": 0.5, "deterministic": True, "dataset": "mnist", "model": "cnn"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["oops"])
