"""ONNX's backend node test cases for every op the MAX importer supports.

All runnable cases are compiled as ONE MAX graph (sdsecure.engine.nodecases), so this takes a few
minutes cold and seconds when MAX's cache is warm. Every case of a supported op must pass, except the
explicit list below: attribute/type combinations the importer refuses up front, with
UnsupportedOpError, instead of computing something else.
"""

from __future__ import annotations

import re

import pytest

from sdsecure.engine import nodecases as nc
from sdsecure.engine.importer import check_supported
from sdsecure.engine.ops import supported_ops
from sdsecure.errors import UnsupportedOpError

# case-name regex -> why the importer refuses it (must be refused, i.e. raise UnsupportedOpError)
KNOWN_UNSUPPORTED: dict[str, str] = {
    r"test_batchnorm_\w+_training_mode": "BatchNormalization training mode (running-statistics outputs)",
    r"test_training_dropout\w*": "Dropout in training mode (random masks)",
    r"test_reduce_\w+_empty_set(_bool|_non_reduced_axis_zero)?": "zero-size tensors (MAX has none)",
    r"test_reshape_allowzero_reordered": "zero-size tensor",
    r"test_slice_start_out_of_bounds": "zero-size result",
    r"test_split_zero_size_splits_opset1[38]": "zero-size outputs",
    r"test_tri[lu]_zero": "zero-size tensor",
    r"test_resize_(up|down)sample_sizes_nearest_not_(larger|smaller)": "Resize keep_aspect_ratio_policy other "
                                                                       "than stretch",
}

# cases refused because MAX has no such element type (bfloat16, float8, int4, strings, ...) or the values
# are not tensors (sequences, optionals): reported as unsupported with this reason, never run
TYPE_REASONS = re.compile(r"element type|sequence/optional values")


def _known(name: str) -> str | None:
    for pattern, why in KNOWN_UNSUPPORTED.items():
        if re.fullmatch(pattern, name):
            return why
    return None


@pytest.fixture(scope="module")
def cases() -> list[nc.Case]:
    supported = set(supported_ops())
    selected = [c for c in nc.load_cases() if c.op in supported]
    return nc.run_cases(selected)


def test_there_are_many_cases(cases) -> None:
    assert len(cases) > 700
    assert sum(c.status == nc.PASS for c in cases) > 600


def test_supported_ops_pass_their_node_cases(cases) -> None:
    bad = []
    for c in cases:
        if c.status in (nc.PASS, nc.FOLDED):
            continue
        if c.status == nc.UNSUPPORTED and (_known(c.name) or TYPE_REASONS.search(c.reason)):
            continue
        bad.append(f"{c.status} {c.name}: {c.reason}")
    assert not bad, f"{len(bad)} node cases did not pass:\n" + "\n".join(bad)


def test_known_unsupported_cases_raise_unsupported_op_error(cases) -> None:
    by_name = {c.name: c for c in cases}
    for pattern in KNOWN_UNSUPPORTED:
        matched = [c for n, c in by_name.items() if re.fullmatch(pattern, n)]
        assert matched, f"no case matches {pattern!r} (stale entry?)"
        for c in matched:
            assert c.status == nc.UNSUPPORTED, f"{c.name} is {c.status}, listed as unsupported"
            if c.folded is not None:
                with pytest.raises(UnsupportedOpError):
                    check_supported(c.folded)
