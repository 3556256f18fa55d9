"""What a trial may try and its recipe (optimize/search/space.py): every kind of trial recipe is one the pipeline
plans."""

from __future__ import annotations

import pytest
import yaml

from optimize import pipeline, search


@pytest.mark.parametrize("target, space, params", [
    ("tensorrt", "compression", {"method": "2:4", "finetune_epochs": 1, "alpha": 0.5, "temperature": 4.0,
                                 "precision": "int8", "calib_method": "minmax", "calib_images": 256}),
    ("tensorrt", "compression", {"method": "l1-channel", "amount": 0.3, "steps": 2, "finetune_epochs": 0,
                                 "precision": "fp16"}),
    ("cpu", "compression", {"method": "none", "precision": "fp32"}),
    ("cpu-latency", "compression", {"method": "l1-channel", "amount": 0.5, "steps": 1, "finetune_epochs": 0,
                                    "precision": "qdq-s8s8", "calib_method": "entropy", "calib_images": 128}),
    ("cpu", "training", {"lr": 1e-3, "batch_size": 64, "weight_decay": 0.01, "label_smoothing": 0.1}),
])
def test_every_kind_of_trial_recipe_is_a_valid_pipeline_recipe(trained, tmp_path, target, space, params):
    """Trial recipes are planned by the pipeline itself: a key a stage does not take would be refused here."""

    target, _, objective = target.partition("-")
    cfg = search.SearchConfig(teacher=str(trained), out=str(tmp_path), target=target, space=space, preset="quick",
                              objective=objective or "throughput")
    recipe = search.trial_recipe(params, cfg, teacher=trained, student=None if space == "training" else trained,
                                 data="fashion-mnist")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # planned as for the machine it will run on (a TensorRT trial's benchmark runs on CUDA, which this one lacks)
    _, steps = pipeline.plan(pipeline.PipelineConfig(out=str(tmp_path / "run"), preset="quick", recipe=str(path)),
                             here=False)
    names = [name for name, _ in steps]
    assert names[-1] == "benchmark" and "export" in names
    configs = dict(steps)
    if space == "training":
        assert configs["distill"].loop.lr == 1e-3 and configs["distill"].loop.batch_size == 64
        assert "prune" not in configs
    elif params["method"] == "none":
        assert "prune" not in configs and "calibrate" not in configs and "distill" not in configs
    else:
        assert configs["prune"].method == params["method"]
    devices = search.space.trial_devices(cfg)
    assert recipe["device"] == devices.train and configs["benchmark"].device == devices.measure
    assert devices == (search.space.TrialDevices("cuda", "cuda") if target == "tensorrt"
                       else search.space.TrialDevices("auto", "cpu"))
    assert configs["benchmark"].batch_sizes == ((1,) if objective == "latency" else (8,))
    if params.get("precision", "").startswith("q"):
        assert configs["calibrate"].form == params["precision"] and configs["calibrate"].target == "cpu"
