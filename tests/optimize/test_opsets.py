"""The opsets edgeopt writes (optimize/opsets.py): the limits come from the installed torch and onnx, and a
refused opset's error names the range and the fix. (ExportConfig's use of the check: tests/optimize/test_configs.py;
the CLI's one-line error: tests/e2e/test_hostile_outputs.py.)"""

from __future__ import annotations

import onnx
import pytest
import torch

from optimize.errors import ConfigError
from optimize.opsets import DEFAULT_OPSET, DYNAMO_OPSET, check_opset, opset_range


def test_the_range_is_what_both_the_exporter_and_onnx_can_write():
    low, high = opset_range()
    assert 7 <= low <= DEFAULT_OPSET <= high  # the default is always one the installed libraries write
    assert high <= onnx.defs.onnx_opset_version()  # never past what the installed onnx knows
    assert DEFAULT_OPSET < DYNAMO_OPSET <= onnx.defs.onnx_opset_version()


def test_every_opset_in_the_range_passes():
    low, high = opset_range()
    for opset in (low, DEFAULT_OPSET, high):
        check_opset(opset)  # no error


@pytest.mark.parametrize("side", ["below", "above"])
def test_an_opset_out_of_range_names_the_range_and_the_fix(side):
    low, high = opset_range()
    opset = low - 1 if side == "below" else high + 1
    with pytest.raises(ConfigError) as refused:
        check_opset(opset)
    message = str(refused.value)
    assert message.startswith(f"--opset {opset}: torch {torch.__version__}'s ONNX exporter writes opsets {low} to "
                              f"{high}; give one of those")
    assert f"({DEFAULT_OPSET} suits TensorRT 8.6 and later, and ONNX Runtime)" in message
