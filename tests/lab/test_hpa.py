"""The HPA emulation against the algorithm as Kubernetes documents and implements it, as timelines."""

from __future__ import annotations

import pytest

from lab.hpa import (
    Behavior, HorizontalPodAutoscaler, HpaSpec, MetricTarget, ScalingPolicy, ScalingRules, metric_replicas,
)

PER_REPLICA_10 = MetricTarget("AverageValue", 10)


def hpa(min_replicas=1, max_replicas=100, behavior=None, tolerance=0.1) -> HorizontalPodAutoscaler:
    return HorizontalPodAutoscaler(HpaSpec(min_replicas, max_replicas, behavior or Behavior(), tolerance))


def test_average_value_asks_for_total_over_target_rounded_up():
    assert metric_replicas(PER_REPLICA_10, 95, current_replicas=4, ready_replicas=4, tolerance=0.1) == 10
    assert metric_replicas(PER_REPLICA_10, 5, current_replicas=4, ready_replicas=4, tolerance=0.1) == 1


def test_within_the_tolerance_nothing_changes():
    assert metric_replicas(PER_REPLICA_10, 43, 4, 4, 0.1) == 4  # ratio 1.075: inside
    assert metric_replicas(PER_REPLICA_10, 45, 4, 4, 0.1) == 5  # ratio 1.125: outside
    assert metric_replicas(PER_REPLICA_10, 36, 4, 4, 0.1) == 4  # ratio 0.90: inside


def test_the_default_tolerance_swallows_a_one_replica_step_from_ten_replicas_up():
    """README's claim about the scaler's value in replicas (AverageValue 1) under the HPA."""
    replicas = MetricTarget("AverageValue", 1)
    assert hpa().sync(0, 12, [(replicas, 13)]).desired_replicas == 12  # 13 / 12 = 1.083: inside 10 %
    assert hpa().sync(0, 12, [(replicas, 11)]).desired_replicas == 12
    assert hpa().sync(0, 9, [(replicas, 10)]).desired_replicas == 10  # 10 / 9 = 1.111: applied
    assert hpa(tolerance=0).sync(0, 12, [(replicas, 13)]).desired_replicas == 13


def test_the_shipped_behavior_applies_the_scalers_one_replica_steps_at_any_size():
    """Issue 12's case: the scaler decides 13 with 12 ready (AverageValue 1, max 16)."""
    from lab.hpa import PASS_THROUGH

    replicas = MetricTarget("AverageValue", 1)
    for current, decided in ((12, 13), (13, 14), (16, 15)):
        controller = hpa(max_replicas=16, behavior=PASS_THROUGH)
        assert controller.sync(0, current, [(replicas, decided)]).desired_replicas == decided


def test_each_direction_has_its_own_tolerance_and_the_cluster_default_fills_the_other():
    replicas = MetricTarget("AverageValue", 1)
    up_only = Behavior.from_spec({"scaleUp": {"tolerance": 0}, "scaleDown": {"stabilizationWindowSeconds": 0}})
    assert hpa(behavior=up_only).sync(0, 12, [(replicas, 13)]).desired_replicas == 13
    assert hpa(behavior=up_only).sync(0, 12, [(replicas, 11)]).desired_replicas == 12  # 10 % down still
    assert Behavior.from_spec({"scaleUp": {"tolerance": "50m"}}).scale_up.tolerance == pytest.approx(0.05)
    with pytest.raises(ValueError, match="tolerance"):
        Behavior.from_spec({"scaleDown": {"tolerance": "-1"}})


def test_a_value_target_scales_the_ready_pods_by_the_ratio():
    total = MetricTarget("Value", 100)
    assert metric_replicas(total, 250, current_replicas=4, ready_replicas=2, tolerance=0.1) == 5  # ceil(2.5 x 2)


def test_default_scale_up_is_4_pods_or_double_per_15_seconds_whichever_is_more():
    controller = hpa()
    assert controller.sync(0, 1, [(PER_REPLICA_10, 1000)]).desired_replicas == 5  # max(1+4, 2)
    assert controller.sync(15, 5, [(PER_REPLICA_10, 1000)]).desired_replicas == 10  # max(5+4, 10)
    assert controller.sync(30, 10, [(PER_REPLICA_10, 1000)]).desired_replicas == 20
    result = controller.sync(45, 20, [(PER_REPLICA_10, 1000)])
    assert result.desired_replicas == 40 and result.metric_replicas == 100 and result.reason == "ScaleUpLimit"


def test_scale_events_inside_the_period_count_against_the_limit():
    controller = hpa()
    assert controller.sync(0, 1, [(PER_REPLICA_10, 1000)]).desired_replicas == 5
    # 5 s later the period still holds the +4: the period started at 1 replica
    assert controller.sync(5, 5, [(PER_REPLICA_10, 1000)]).desired_replicas == 5


def test_default_scale_down_waits_for_the_whole_five_minute_window():
    controller = hpa()
    controller.sync(0, 10, [(PER_REPLICA_10, 100)])  # steady at 10
    for t in range(15, 300, 15):
        assert controller.sync(t, 10, [(PER_REPLICA_10, 20)]).desired_replicas == 10
    assert controller.sync(300, 10, [(PER_REPLICA_10, 20)]).desired_replicas == 2  # the 10 left the window


def test_a_new_controller_does_not_scale_down_on_its_first_sync():
    controller = hpa()
    assert controller.sync(0, 8, [(PER_REPLICA_10, 10)]).desired_replicas == 8
    assert controller.sync(301, 8, [(PER_REPLICA_10, 10)]).desired_replicas == 1


def test_scale_up_takes_the_lowest_recommendation_in_its_window():
    behavior = Behavior(scale_up=ScalingRules(60, (ScalingPolicy("Percent", 1000, 15),)))
    controller = hpa(behavior=behavior)
    controller.sync(0, 2, [(PER_REPLICA_10, 20)])
    assert controller.sync(15, 2, [(PER_REPLICA_10, 80)]).desired_replicas == 2  # the 2 at t=0 is in the window
    assert controller.sync(30, 2, [(PER_REPLICA_10, 60)]).desired_replicas == 2
    assert controller.sync(61, 2, [(PER_REPLICA_10, 90)]).desired_replicas == 6  # min(8, 6, 9)


def test_pods_and_percent_policies_with_select_policy_min_and_max_going_down():
    down = (ScalingPolicy("Pods", 2, 60), ScalingPolicy("Percent", 50, 60))
    biggest = hpa(behavior=Behavior(scale_down=ScalingRules(0, down, "Max")))
    smallest = hpa(behavior=Behavior(scale_down=ScalingRules(0, down, "Min")))
    for controller in (biggest, smallest):
        controller.sync(0, 10, [(PER_REPLICA_10, 100)])
    assert biggest.sync(1, 10, [(PER_REPLICA_10, 10)]).desired_replicas == 5  # the larger change: -50 %
    assert smallest.sync(1, 10, [(PER_REPLICA_10, 10)]).desired_replicas == 8  # the smaller change: -2 pods
    # within the same 60 s period the removals already made count against the limit
    assert smallest.sync(2, 8, [(PER_REPLICA_10, 10)]).desired_replicas == 8


def test_percent_up_rounds_up_so_one_replica_can_grow():
    behavior = Behavior(scale_up=ScalingRules(0, (ScalingPolicy("Percent", 10, 60),)))
    assert hpa(behavior=behavior).sync(0, 1, [(PER_REPLICA_10, 100)]).desired_replicas == 2


def test_disabled_select_policy_freezes_that_direction():
    frozen_down = Behavior(scale_down=ScalingRules(0, (ScalingPolicy("Percent", 100, 15),), "Disabled"))
    controller = hpa(behavior=frozen_down)
    controller.sync(0, 6, [(PER_REPLICA_10, 60)])
    assert controller.sync(15, 6, [(PER_REPLICA_10, 1)]).desired_replicas == 6
    assert controller.sync(30, 6, [(PER_REPLICA_10, 200)]).desired_replicas == 12


def test_min_and_max_bound_the_result():
    controller = hpa(min_replicas=2, max_replicas=6)
    assert controller.sync(0, 4, [(PER_REPLICA_10, 1000)]).desired_replicas == 6
    assert controller.sync(0, 9, [(PER_REPLICA_10, 1000)]).reason == "TooManyReplicas"
    assert controller.sync(0, 1, [(PER_REPLICA_10, 0)]).desired_replicas == 2


def test_several_metrics_take_the_largest_proposal_and_a_failed_one_blocks_scale_down():
    controller = hpa(behavior=Behavior(scale_down=ScalingRules(0, (ScalingPolicy("Percent", 100, 15),))))
    controller.sync(0, 5, [(PER_REPLICA_10, 50)])
    both = controller.sync(15, 5, [(PER_REPLICA_10, 20), (MetricTarget("AverageValue", 5), 35)])
    assert both.desired_replicas == 7
    assert controller.sync(30, 7, [(PER_REPLICA_10, 10), (PER_REPLICA_10, None)]).desired_replicas == 7
    assert controller.sync(45, 7, [(PER_REPLICA_10, 200), (PER_REPLICA_10, None)]).desired_replicas == 14
    assert controller.sync(60, 14, [(PER_REPLICA_10, None)]).reason == "FailedGetExternalMetric"


def test_zero_replicas_is_left_to_keda():
    assert hpa().sync(0, 0, [(PER_REPLICA_10, 100)]).desired_replicas == 0


def test_behavior_from_a_spec_fills_kubernetes_defaults():
    behavior = Behavior.from_spec({"scaleDown": {"stabilizationWindowSeconds": 0}})
    assert behavior.scale_down.stabilization_window_seconds == 0
    assert behavior.scale_down.policies == (ScalingPolicy("Percent", 100, 15),)
    assert behavior.scale_up == Behavior().scale_up
    spec = {"scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}], "selectPolicy": "Min"}}
    assert Behavior.from_spec(spec).scale_up == ScalingRules(0, (ScalingPolicy("Pods", 2, 30),), "Min")
    with pytest.raises(ValueError, match="selectPolicy"):
        Behavior.from_spec({"scaleUp": {"selectPolicy": "Sometimes"}})
    with pytest.raises(ValueError, match="Pods or Percent"):
        Behavior.from_spec({"scaleUp": {"policies": [{"type": "Nodes", "value": 1, "periodSeconds": 15}]}})


def test_the_readme_pass_through_behavior_leaves_all_smoothing_to_the_scaler():
    behavior = Behavior.from_spec({
        "scaleUp": {"stabilizationWindowSeconds": 0, "policies": [{"type": "Percent", "value": 1000, "periodSeconds": 15}]},
        "scaleDown": {"stabilizationWindowSeconds": 0, "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
    })
    controller = hpa(max_replicas=16, behavior=behavior)
    controller.sync(0, 2, [(PER_REPLICA_10, 20)])
    assert controller.sync(15, 2, [(PER_REPLICA_10, 160)]).desired_replicas == 16
    assert controller.sync(30, 16, [(PER_REPLICA_10, 10)]).desired_replicas == 1


def test_pass_through_is_what_the_manifests_scaledobject_sets():
    from pathlib import Path

    import yaml

    from lab.hpa import PASS_THROUGH

    path = Path(__file__).resolve().parents[2] / "manifests" / "base" / "scaledobject.yaml"
    behavior = yaml.safe_load(path.read_text())["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert Behavior.from_spec(behavior) == PASS_THROUGH
