"""Configuration: typing, ranges, registries, overrides, and the generated reference."""

from pathlib import Path

import pytest

from mpiopt.algorithms import ALGORITHMS
from mpiopt.config import Config, RunConfig, build_section, coerce, parse_override
from mpiopt.errors import ConfigError
from mpiopt.schema import config_from_dict, config_markdown, load_config

ROOT = Path(__file__).resolve().parents[2]
BASE = {"problem": {"name": "softmax"}, "data": {"name": "digits"},
        "algorithm": {"name": "allreduce"}}


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        fn(*args, **kw)
    return str(exc.value)


def test_defaults_and_types():
    cfg = config_from_dict(BASE)
    assert isinstance(cfg, Config) and cfg.run.steps == 200
    assert cfg.algorithm.NAME == "allreduce" and cfg.algorithm.lr == 0.1
    assert cfg.to_dict()["algorithm"]["name"] == "allreduce"


@pytest.mark.parametrize("value,tp,expected", [
    (3, int, 3), (3.0, int, 3), (2, float, 2.0), ("1e-3", float, 1e-3), (True, bool, True),
    ("x", str, "x"), (None, int | None, None), ([1, 2], tuple[int, ...], (1, 2)),
    (5, tuple[int, ...], (5,)),
])
def test_coerce_accepts(value, tp, expected):
    assert coerce(value, tp, "k") == expected


@pytest.mark.parametrize("value,tp", [
    (True, int), (2.5, int), ("a", float), (1, bool), ("yes", bool), (3, str), ({}, float),
    ([1, "a"], tuple[int, ...]),
])
def test_coerce_rejects_with_key(value, tp):
    assert error_of(coerce, value, tp, "algorithm.x").startswith("algorithm.x: expected")


@pytest.mark.parametrize("section,key,value,message", [
    ("algorithm", "lr", -0.1, "algorithm.lr: must be in (0, inf), got -0.1"),
    ("algorithm", "lr", 0, "algorithm.lr: must be in (0, inf), got 0.0"),
    ("algorithm", "momentum", 1.0, "algorithm.momentum: must be in [0, 1), got 1.0"),
    ("data", "batch_size", 0, "data.batch_size: must be in [1, inf), got 0"),
    ("run", "target_accuracy", 1.5, "run.target_accuracy: must be in [0, 1], got 1.5"),
    ("data", "partition", "zipf", "data.partition: 'zipf' is not one of: iid, dirichlet, "
     "shards"),
    ("algorithm", "schedule", "exp", "algorithm.schedule: 'exp' is not one of: constant, "
     "step, cosine, inverse_power"),
    ("algorithm", "lr", float("nan"), "algorithm.lr: must be finite, got nan"),
    ("run", "cuda_aware", "maybe", "run.cuda_aware: 'maybe' is not one of: auto, true, false"),
])
def test_out_of_range_values(section, key, value, message):
    raw = {s: dict(v) for s, v in BASE.items()}
    raw.setdefault(section, {})[key] = value
    assert error_of(config_from_dict, raw) == message


def test_unknown_names_list_the_valid_ones():
    msg = error_of(config_from_dict, {**BASE, "algorithm": {"name": "adam"}})
    assert msg == "algorithm.name: unknown algorithm 'adam'; valid: " + ", ".join(
        ALGORITHMS.names())
    assert "valid: a2c, lda, mlp, softmax" in error_of(config_from_dict, {**BASE, "problem": {
        "name": "cnn"}})
    assert ("valid: bow, digits, fashion_mnist, hdf5, news, none, reuters, synthetic, "
            "synthetic_lda" in error_of(config_from_dict, {**BASE, "data": {"name": "imagenet"}}))
    assert error_of(config_from_dict, {"problem": {"name": "mlp"}}).startswith(
        "data.name: missing; valid:")


def test_unknown_keys_and_sections():
    msg = error_of(config_from_dict, {**BASE, "algorithm": {"name": "allreduce", "lrr": 1}})
    assert msg.startswith("algorithm.lrr: unknown key for algorithm 'allreduce'; valid keys:")
    assert "lr," in msg
    assert error_of(config_from_dict, {**BASE, "optim": {}}) == (
        "optim: unknown section; valid: problem, data, algorithm, run")
    assert error_of(config_from_dict, {**BASE, "run": [1]}) == (
        "run: must be a mapping of keys to values")


def test_overrides_are_typed_and_name_switch_prunes():
    cfg = config_from_dict(BASE, ["algorithm.lr=0.5", "run.steps=7", "problem.name=mlp",
                                  "problem.hidden=[8, 4]"])
    assert cfg.algorithm.lr == 0.5 and cfg.run.steps == 7 and cfg.problem.hidden == (8, 4)
    raw = {**BASE, "algorithm": {"name": "local_sgd", "local_steps": 3}}
    cfg = config_from_dict(raw, ["algorithm.name=allreduce"])
    assert cfg.algorithm.NAME == "allreduce"
    assert cfg.warnings == ("algorithm.local_steps does not apply to algorithm 'allreduce' "
                            "and is ignored",)
    # Without a name switch an unknown key is still an error.
    assert "unknown key" in error_of(config_from_dict, raw, ["algorithm.lr=0.2",
                                                             "algorithm.foo=1"])


@pytest.mark.parametrize("text,message", [
    ("lr=0.1", "--set: 'lr' is not section.key with section one of: problem, data, "
     "algorithm, run"),
    ("algorithm.lr", "--set: expected dotted.key=value, got 'algorithm.lr'"),
    ("optim.lr=1", "--set: 'optim.lr' is not section.key with section one of: problem, "
     "data, algorithm, run"),
])
def test_bad_overrides(text, message):
    assert error_of(parse_override, text) == message


def test_relations_between_keys():
    msg = error_of(config_from_dict, {**BASE, "algorithm": {"name": "allreduce",
                                                            "nesterov": True}})
    assert msg == "algorithm.nesterov: needs algorithm.momentum > 0"


def test_files(tmp_path):
    assert error_of(load_config, str(tmp_path / "nope.yaml")) == (
        f"config file not found: {tmp_path / 'nope.yaml'}")
    bad = tmp_path / "bad.yaml"
    bad.write_text("problem: [1\n")
    assert error_of(load_config, str(bad)).startswith(f"invalid YAML in {bad} at line 2")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert "top level must be a mapping" in error_of(load_config, str(listy))
    assert "cannot read config file" in error_of(load_config, str(tmp_path))


def test_shipped_configs_validate():
    for path in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):
        load_config(str(path))


def test_run_section_is_frozen():
    run = build_section(RunConfig, {"steps": 5}, "run")
    with pytest.raises(AttributeError):
        run.steps = 6


def test_reference_doc_is_current():
    text = (ROOT / "docs" / "config.md").read_text()
    assert text == config_markdown(), "regenerate: python -m mpiopt.schema > docs/config.md"


def test_adversaries_take_a_count_or_ranks_checked_against_the_world():
    from mpiopt.algorithms.signum import adversary_ranks

    cfg = config_from_dict({**BASE, "algorithm": {"name": "signum", "adversaries": 2}})
    assert cfg.algorithm.adversaries == 2
    assert adversary_ranks(2, 5) == (3, 4)
    cfg.algorithm.check_world(2)
    with pytest.raises(ConfigError, match="3 adversaries but only 2 ranks") as e:
        config_from_dict({**BASE, "algorithm": {"name": "signum",
                                                "adversaries": 3}}).algorithm.check_world(2)
    assert e.value.key == "algorithm.adversaries"
    listed = config_from_dict({**BASE, "algorithm": {"name": "signum",
                                                     "adversaries": [4, 1]}}).algorithm
    assert listed.adversaries == (4, 1) and adversary_ranks(listed.adversaries, 5) == (1, 4)
    with pytest.raises(ConfigError, match="rank 4 does not exist"):
        listed.check_world(4)
    with pytest.raises(ConfigError, match="listed twice"):
        config_from_dict({**BASE, "algorithm": {"name": "signum", "adversaries": [1, 1]}}
                         ).algorithm.check_world(4)
    with pytest.raises(ConfigError, match="must be in"):
        config_from_dict({**BASE, "algorithm": {"name": "signum", "adversaries": -1}})
    with pytest.raises(ConfigError, match="invert, random"):
        config_from_dict({**BASE, "algorithm": {"name": "signum", "adversary": "flip"}})


def test_swarm_keys_are_checked():
    cfg = config_from_dict({**BASE, "algorithm": {"name": "swarm", "quantize": "lattice8"}})
    cfg.algorithm.check_world(4)
    assert error_of(config_from_dict, {**BASE, "algorithm": {"name": "swarm", "slow_s": 1}}) \
        .startswith("algorithm.slow_s: unknown key for algorithm 'swarm'")  # run.slowdown now
    assert "none, fp16, lattice16, lattice8" in error_of(
        config_from_dict, {**BASE, "algorithm": {"name": "swarm", "quantize": "int4"}})
    assert "pull, pairwise" in error_of(
        config_from_dict, {**BASE, "algorithm": {"name": "swarm", "mode": "push"}})
    assert "auto, thread, none" in error_of(
        config_from_dict, {**BASE, "algorithm": {"name": "swarm", "progress": "mpich"}})
    assert "mode: pull" in error_of(config_from_dict, {**BASE, "algorithm": {
        "name": "swarm", "rma_sync": "locks", "mode": "pairwise"}})
    assert "epoch, locks" in error_of(
        config_from_dict, {**BASE, "algorithm": {"name": "swarm", "rma_sync": "lock"}})
    assert "algorithm.publish_slots" in error_of(
        config_from_dict, {**BASE, "algorithm": {"name": "swarm", "publish_slots": 1}})
    assert "algorithm.progress_interval_s" in error_of(
        config_from_dict, {**BASE, "algorithm": {"name": "swarm", "progress_interval_s": 0}})
    lattice = cfg.algorithm.compressor(4)
    assert lattice.params["q"] == 256 and lattice.params["eps"] == 0.0035
    sixteen = config_from_dict({**BASE, "algorithm": {"name": "swarm",
                                                      "quantize": "lattice16"}}).algorithm
    assert sixteen.compressor(7).params["eps"] == 0.0035 / 7
    with pytest.raises(ConfigError, match="random_regular"):
        config_from_dict({**BASE, "algorithm": {"name": "swarm", "topology": "star"}}
                         ).algorithm.check_world(4)


def test_slowdown_is_a_mapping_of_ranks_to_factors():
    cfg = config_from_dict(BASE, ["run.slowdown={1: 20, 3: 2.5}"])
    assert cfg.run.slowdown == {1: 20.0, 3: 2.5}
    assert "slowdown:\n    1: 20.0\n    3: 2.5" in cfg.to_yaml()
    assert config_from_dict(BASE).run.slowdown == {}
    assert error_of(config_from_dict, BASE, ["run.slowdown={1: 0.5}"]) == (
        "run.slowdown: must be in [1, inf), got 0.5")
    assert error_of(config_from_dict, BASE, ["run.slowdown=3"]) == (
        "run.slowdown: expected mapping of integer to number, got 3")
    assert error_of(config_from_dict, BASE, ["run.slowdown={one: 2}"]) == (
        "run.slowdown: expected integer, got 'one'")
    cfg.run.check_world(4)
    with pytest.raises(ConfigError, match="run.slowdown: rank 3 does not exist"):
        cfg.run.check_world(3)


def test_parameter_servers_must_leave_a_worker():
    cfg = config_from_dict({**BASE, "algorithm": {"name": "gsgm", "servers": 3}})
    cfg.algorithm.check_world(4)
    assert cfg.algorithm.roles(4) == ("server", "server", "server", "worker")
    with pytest.raises(ConfigError) as e:
        cfg.algorithm.check_world(3)
    assert e.value.key == "algorithm.servers"
    assert str(e.value).endswith("3 servers leave no worker among 3 ranks; valid: 1..2")
    with pytest.raises(ConfigError) as e:  # partial counts the workers, not the ranks
        config_from_dict({**BASE, "algorithm": {"name": "gsgm", "servers": 2,
                                                "partial": 3}}
                         ).algorithm.check_world(4)
    assert e.value.key == "algorithm.partial"


@pytest.mark.parametrize("key, value, message", [
    ("cores_mode", "processes", "'processes' is not one of: ranks, threads"),
    ("node_size", 0, "must be in [1, inf), got 0"),
    ("local_steps", 0, "must be in [1, inf), got 0"),
    ("cores", 0, "must be in [1, inf), got 0"),
])
def test_dpsgd_bad_keys(key, value, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, "algorithm": {"name": "dpsgd", key: value}})
    assert e.value.key == f"algorithm.{key}" and message in str(e.value)
