"""calib.ranges on a tiny ONNX model: the ranges ONNX Runtime's calibrators give when fed one batch at a time,
checked against numpy on the model's own tensors, and the cache ``quantize_static`` reads back."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization.calibrate import load_tensors_data

from calib import ranges

BATCHES, BATCH = 4, 8


def _batches(tiny_onnx) -> list[dict[str, np.ndarray]]:
    """Four batches of a different scale each: a later batch holds every tensor's extremes, not the first."""
    session = ort.InferenceSession(str(tiny_onnx.path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    rng = np.random.default_rng(0)
    return [{spec.name: (rng.standard_normal((BATCH, *spec.shape[1:])) * (1 + k)).astype(np.float32)}
            for k in range(BATCHES)]


def _every_tensor(model_path, names, batches) -> dict[str, list[np.ndarray]]:
    """Each named tensor's values on each batch: the model with those tensors made graph outputs, run as is."""
    model = onnx.load(str(model_path))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
                              if n not in have)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs() if o.name in names]
    runs = [dict(zip(wanted, session.run(wanted, batch))) for batch in batches]
    return {n: [run[n] for run in runs] for n in wanted}


def _range(tensor) -> tuple[float, float]:
    """A tensor's (low, high) as floats (ONNX Runtime keeps each as a one-element array)."""
    low, high = tensor.range_value
    return np.asarray(low).item(), np.asarray(high).item()


@pytest.fixture(scope="module")
def minmax(tiny_onnx, tmp_path_factory):
    batches = _batches(tiny_onnx)
    found = ranges.collect(tiny_onnx.path, iter(batches), method="minmax", work=tmp_path_factory.mktemp("minmax"))
    return batches, found


def test_minmax_one_batch_at_a_time_is_the_min_and_max_over_all_batches(tiny_onnx, minmax):
    batches, found = minmax
    names = set(found.data)
    graph = onnx.load(str(tiny_onnx.path)).graph
    assert {i.name for i in graph.input} <= names and {o.name for o in graph.output} <= names  # every float tensor
    values = _every_tensor(tiny_onnx.path, names, batches)
    assert set(values) == names
    for name, per_batch in values.items():
        low, high = _range(found.data[name])
        np.testing.assert_allclose([low, high], [min(v.min() for v in per_batch), max(v.max() for v in per_batch)],
                                   rtol=1e-5, atol=1e-6, err_msg=name)
        # not the first batch's alone: the later, wider batches moved the range
        assert high > per_batch[0].max() or low < per_batch[0].min(), name


def test_the_saved_cache_reads_back_as_onnx_runtime_reads_it(minmax, tmp_path):
    _, found = minmax
    path = tmp_path / "cache" / "ort-cache.json"
    ranges.save(found, path)
    back = load_tensors_data(path)
    assert back.calibration_method == found.calibration_method and set(back.data) == set(found.data)
    for name, tensor in found.data.items():
        np.testing.assert_array_equal(back.data[name].range_value, tensor.range_value, err_msg=name)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_entropy_and_percentile_ranges_lie_inside_minmax(tiny_onnx, minmax, method, tmp_path):
    batches, wide = minmax
    found = ranges.collect(tiny_onnx.path, iter(batches), method=method, work=tmp_path)
    assert set(found.data) == set(wide.data)
    for name, tensor in found.data.items():
        (low, high), (w_low, w_high) = _range(tensor), _range(wide.data[name])
        # entropy: a threshold within the histogram; percentile: a cut of the values; each clipped to min and max
        assert w_low - 1e-6 <= low <= high <= w_high + 1e-6, (name, (low, high), (w_low, w_high))
    assert any(_range(t)[1] < _range(wide.data[n])[1] - 1e-6 for n, t in found.data.items())  # some cut


def test_no_batch_is_an_error(tiny_onnx, tmp_path):
    with pytest.raises(ValueError, match="no calibration batch"):
        ranges.collect(tiny_onnx.path, iter([]), method="minmax", work=tmp_path)
