"""The compact schedule text ('fastv@2:0.5>4:64t'): `parse_schedule` reads back exactly what `schedule_text` writes,
and bad text fails with one line naming the stage at fault."""

import pytest

from tuner.config import PruningConfig, Stage, parse_schedule, schedule_text

ROUND_TRIPS = [
    PruningConfig(method="dart", layer=2, keep_ratio=0.25),  # one stage, a share
    PruningConfig(method="fastv", layer=3, budget=64),  # one stage, a budget
    PruningConfig(method="keep_all", layer=1),  # no amount
    PruningConfig(method="random", layer=2, keep_ratio=1.0),  # 1.0 reads '1'
    PruningConfig(method="random", layer=2, keep_ratio=0.123456789),  # more digits than '%g' keeps
    PruningConfig(method="fastv", layer=2, keep_ratio=0.5, stages=(Stage(4, 0.5), Stage(6, 0.5))),  # PyramidDrop
    PruningConfig(method="fastv", layer=2, budget=192, stages=(Stage(4, budget=96), Stage(6, keep_ratio=0.5))),
    PruningConfig(method="dart", layer=2, keep_ratio=0.5,  # switch, stay on the new method, switch back
                  stages=(Stage(3, 0.5, method="fastv"), Stage(5, budget=8, method="fastv"), Stage(7, 0.5))),
]


@pytest.mark.parametrize("config", ROUND_TRIPS, ids=schedule_text)
def test_parse_is_the_inverse_of_schedule_text(config):
    assert parse_schedule(schedule_text(config)) == config


def test_the_text_of_a_pyramid_schedule_and_the_other_fields():
    config = parse_schedule("fastv@2:0.5>4:0.5>random@6:8t", seed=3)
    assert config.layers == (2, 4, 6) and config.seed == 3
    assert [(c.method, c.keep_ratio, c.budget) for c in config.stage_configs()] == [
        ("fastv", 0.5, None), ("fastv", 0.5, None), ("random", None, 8)]
    # Options belong to the first stage's method and reach the later stages that run it.
    dart = parse_schedule("dart@2:0.5>4:0.5", options={"n_image_pivots": 2, "pivot_metric": "l2"})
    assert dart.stage_config(1).options == dart.options
    assert (dart.options["n_image_pivots"], dart.options["pivot_metric"]) == (2, "l2")


def test_a_stage_naming_the_first_method_again_reads_back_as_the_same_schedule():
    """schedule_text drops a repeated method name, so the parser gives the canonical (method=None) stage."""
    explicit = PruningConfig(method="fastv", layer=2, keep_ratio=0.5, stages=(Stage(4, 0.5, method="fastv"),))
    parsed = parse_schedule(schedule_text(explicit))
    assert parsed.stages[0].method is None and parsed.stage_configs() == explicit.stage_configs()


@pytest.mark.parametrize(("text", "message"), [
    ("", "a schedule must be text"),
    ("2:0.5", "stage 1 '2:0.5': the first stage must name its method"),
    ("fastv@2:0.5>>4:0.5", "stage 2 '' must read [method@]layer:amount"),
    ("fastv@2", "stage 1 'fastv@2' must read [method@]layer:amount"),
    ("@2:0.5", "stage 1 '@2:0.5' has '@' without a method name"),
    ("fastv@x:0.5", "stage 1 'fastv@x:0.5': layer 'x' is not a whole number"),
    ("fastv@2:0.5>4:1.5", "stage 2 '4:1.5': amount '1.5' is not a share in (0, 1]"),
    ("fastv@2:64", "stage 1 'fastv@2:64': amount '64' is not a share"),
    ("fastv@2:0.5>nope@4:0.5", "stage 2 'nope@4:0.5': unknown pruning method 'nope'; available:"),
    ("fastv@2:0.5>2:0.5", "stages[0].layer must be an int above the previous stage's layer 2"),
    ("random@2:0t", "budget must be an int >= 1"),
])
def test_bad_text_is_one_line_naming_the_culprit(text, message):
    with pytest.raises(ValueError) as error:
        parse_schedule(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_schedule_owns_its_fields():
    with pytest.raises(ValueError, match=r"the schedule sets \['layer'\] itself"):
        parse_schedule("dart@2:0.5", layer=3)


def test_tables_round_a_samplers_share_but_the_exact_text_reads_back():
    config = PruningConfig(method="divprune", layer=0, keep_ratio=0.25002262102234907,
                           stages=(Stage(3, 0.5159155971068916, method="fastv"),))
    assert schedule_text(config, exact=False) == "divprune@0:0.25>fastv@3:0.516"
    assert parse_schedule(schedule_text(config)) == config
