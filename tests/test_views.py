"""MLflow UI saved views of a sweep (kdtune.tracking.views): what the runs table shows, saved once per view
as experiment tags the UI reads; searched keys under their logged names."""

from __future__ import annotations

import json

import pytest

from kdtune.tracking.trial import logged_names
from kdtune.tracking.views import (
    ALL_TRIALS,
    VIEW_TAG_PREFIX,
    runs_url,
    sweep_views,
    view_id,
    view_tags,
    views_of,
)


def test_logged_names_are_the_trial_params_names():
    assert logged_names("dkd", ["beta", "lr", "train.weight_decay"]) == ["dkd.beta", "train.lr",
                                                                         "train.weight_decay"]  # fmt: skip
    assert logged_names("ipwd", ["momentum"]) == ["ipwd.momentum"]  # IPWD's own momentum, not SGD's


def test_sweep_views_columns_filters_and_order():
    views = sweep_views("val_acc", "max", [("resnet8-dkd", ["dkd.beta", "train.lr"]), ("resnet8/kd x", ["kd.T"])])
    assert list(views) == [ALL_TRIALS, "kdtune-resnet8-dkd", "kdtune-resnet8-kd-x"] and view_id("a b") == "kdtune-a-b"
    st = views[ALL_TRIALS]["state"]
    assert st["searchFilter"] == "tags.`kdtune.role` = 'trial'"
    assert st["orderByKey"] == "metrics.`val_acc`" and st["orderByAsc"] is False
    assert st["selectedColumns"][:3] == ["metrics.`val_acc`", "metrics.`test_acc`", "params.`method`"]
    dkd = views["kdtune-resnet8-dkd"]["state"]
    assert dkd["searchFilter"].endswith("AND tags.`kdtune.group` = 'resnet8-dkd'")
    assert dkd["selectedColumns"][-2:] == ["params.`dkd.beta`", "params.`train.lr`"]
    assert sweep_views("val_loss", "min", [])[ALL_TRIALS]["state"]["orderByAsc"] is True
    many = sweep_views("val_acc", "max", [(f"g{i}", []) for i in range(60)])
    assert len(many) == 40  # the UI's cap on saved views per experiment


def test_view_tags_are_the_uis_envelope_and_idempotent():
    views = sweep_views("val_acc", "max", [("resnet8-kd", ["kd.T"])])
    tags = view_tags(views, {}, now_ms=1000)
    assert set(tags) == {VIEW_TAG_PREFIX + ALL_TRIALS, VIEW_TAG_PREFIX + "kdtune-resnet8-kd"}
    env = json.loads(tags[VIEW_TAG_PREFIX + ALL_TRIALS])
    assert env["name"] == "kdtune: all trials" and env["createdAt"] == env["updatedAt"] == 1000
    assert json.loads(env["state"]) == views[ALL_TRIALS]["state"]  # state: the page's JSON, as a string
    assert view_tags(views, tags, now_ms=2000) == {}  # nothing to write again
    changed = sweep_views("val_acc", "max", [("resnet8-kd", ["kd.T", "train.lr"])])
    again = view_tags(changed, tags, now_ms=3000)
    assert list(again) == [VIEW_TAG_PREFIX + "kdtune-resnet8-kd"]
    env = json.loads(again[VIEW_TAG_PREFIX + "kdtune-resnet8-kd"])
    assert env["createdAt"] == 1000 and env["updatedAt"] == 3000  # a view keeps its creation time
    assert views_of([*tags.items(), (VIEW_TAG_PREFIX + "bad", "{"), ("other", "x")]) == views


def test_runs_url_opens_the_training_mode_on_a_view():
    assert runs_url("http://h:1/", "7") == ("http://h:1/#/experiments/7/runs?workflowType=machine_learning"
                                            "&viewStateShareKey=kdtune-trials")  # fmt: skip
    assert runs_url("http://h:1", "7", None).endswith("/runs?workflowType=machine_learning")


def test_sweep_tracker_saves_views_once(tmp_path):
    pytest.importorskip("mlflow")
    from kdtune.tracking import SweepTracker, default_tracking_uri

    st = SweepTracker(default_tracking_uri(tmp_path), "views")
    views = sweep_views("val_acc", "max", [("resnet8-kd", ["kd.T"])])
    assert st.save_views(views) == 2 and st.save_views(views) == 0
    tags = st.client.get_experiment(st.experiment_id).tags
    assert views_of(tags.items()) == views
