"""DistNormConfig.from_dict: defaults, nesting, and one clear error per bad key."""

from __future__ import annotations

import dataclasses

import pytest

from distnorm.config import ConvertConfig, DistNormConfig, convert_field, from_dict


def test_defaults_and_nested_sections() -> None:
    assert DistNormConfig.from_dict(None) == DistNormConfig()
    cfg = DistNormConfig.from_dict({"tp_size": 2, "convert": {"layer_norm": "sharded"},
                                    "sync": {"grad_sync": "deferred"}, "overlap": {"enabled": True}})
    assert cfg.tp_size == 2 and cfg.convert == ConvertConfig(layer_norm="sharded")
    assert cfg.sync.grad_sync == "deferred" and cfg.overlap.enabled and cfg.overlap.mode == "reduce_scatter"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tp_size = 4  # type: ignore[misc]


@pytest.mark.parametrize("section,error,match", [
    ({"tp": 2}, ValueError, r"^distnorm\.tp: unknown key \(value 2\); valid keys: \['tp_size'"),
    ({"convert": {"layernorm": "sharded"}}, ValueError, r"^distnorm\.convert\.layernorm: unknown key"),
    ({"tp_size": "2"}, TypeError, r"^distnorm\.tp_size: must be int, got str '2'"),
    ({"tp_size": True}, TypeError, r"^distnorm\.tp_size: must be int, got bool True"),
    ({"tp_size": 0}, ValueError, r"^distnorm\.tp_size: must be an int >= 1, got 0"),
    ({"convert": {"batch_norm": "group_norm"}}, ValueError,
     r"^distnorm\.convert\.batch_norm: must be one of 'keep', 'sync_batch_norm', .* got 'group_norm'"),
    ({"overlap": {"enabled": "yes"}}, TypeError, r"^distnorm\.overlap\.enabled: must be bool, got str 'yes'"),
    ({"sync": []}, TypeError, r"^distnorm\.sync: must be a table/object of \['grad_sync'\], got list"),
])
def test_bad_section_names_the_key(section: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DistNormConfig.from_dict(section)


def test_from_dict_where_prefix_and_floats() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Run:
        lr: float = 0.1
        name: str = "x"

    assert from_dict(Run, {"lr": 1}).lr == 1.0
    with pytest.raises(TypeError, match=r"^run\.toml\.lr: must be a number, got str"):
        from_dict(Run, {"lr": "fast"}, where="run.toml")
    with pytest.raises(TypeError, match="cls must be a dataclass"):
        from_dict(dict, {})  # type: ignore[type-var]


def test_debug_section_turns_on_consistency_checks():
    from distnorm import debug
    from distnorm.config import DistNormConfig

    assert DistNormConfig.from_dict({}).debug.consistency_checks is False
    with pytest.raises(ValueError, match=r"distnorm\.debug\.checks"):
        DistNormConfig.from_dict({"debug": {"checks": True}})
    cfg = DistNormConfig.from_dict({"debug": {"consistency_checks": True}})
    before = debug.consistency_checks_enabled()
    try:
        debug.enable_consistency_checks(False)
        DistNormConfig.from_dict({}).apply_debug()
        assert not debug.consistency_checks_enabled()
        cfg.apply_debug()
        assert debug.consistency_checks_enabled()
    finally:
        debug.enable_consistency_checks(before)


def test_convert_field_names_where_the_value_came_from() -> None:
    assert convert_field(DistNormConfig, "convert.layer_norm", "sharded", where="cli") == "sharded"
    assert convert_field(DistNormConfig, "tp_size", 2, where="cli") == 2
    with pytest.raises(ValueError, match=r"^command line --ln \(convert.layer_norm\): must be one of 'keep', .* got 'x'"):
        convert_field(DistNormConfig, "convert.layer_norm", "x", where="command line --ln (convert.layer_norm)")
    with pytest.raises(TypeError, match=r"^cli: must be int, got str '2'"):
        convert_field(DistNormConfig, "tp_size", "2", where="cli")
    with pytest.raises(ValueError, match=r"^cli: 'convert.norm' is not a field of DistNormConfig"):
        convert_field(DistNormConfig, "convert.norm", 1, where="cli")
    with pytest.raises(ValueError, match=r"^cli: 'tp_size.x' is not a field of DistNormConfig"):
        convert_field(DistNormConfig, "tp_size.x", 1, where="cli")
