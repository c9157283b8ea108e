"""The safetensors header check names each real problem once: a tensor refused for its dtype or
shape still owns its bytes (no spurious "bytes that belong to no tensor"), while bytes that no
entry claims are still reported."""
from __future__ import annotations

import pytest

from service.upload.safetensors_header import HeaderLimits, check_safetensors
from tests.hotswap.bundles import raw_safetensors

LIMITS = HeaderLimits(max_header_bytes=16 * 1024, max_tensors=64)
NAME = "adapter_model.safetensors"


def _t(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CASES = {
    "F64 tensor first": ({"a": _t("F64", [2], 0, 16), "b": _t("F32", [2], 16, 24)}, 24,
                         [f"{NAME}: tensor 'a': dtype 'F64' is not allowed (only F32, F16, BF16)"]),
    "F64 tensor between two": ({"a": _t("F32", [2], 0, 8), "b": _t("F64", [3], 8, 32), "c": _t("F16", [4], 32, 40)}, 40,
                               [f"{NAME}: tensor 'b': dtype 'F64' is not allowed (only F32, F16, BF16)"]),
    "only an F64 tensor": ({"a": _t("F64", [2], 0, 16)}, 16,
                           [f"{NAME}: tensor 'a': dtype 'F64' is not allowed (only F32, F16, BF16)"]),
    "two refused dtypes": ({"a": _t("I64", [1], 0, 8), "b": _t("F64", [1], 8, 16), "c": _t("F32", [1], 16, 20)}, 20,
                           [f"{NAME}: tensor 'a': dtype 'I64' is not allowed (only F32, F16, BF16)",
                            f"{NAME}: tensor 'b': dtype 'F64' is not allowed (only F32, F16, BF16)"]),
    "byte count off, then a sound tensor": ({"a": _t("F32", [4], 0, 8), "b": _t("F32", [2], 8, 16)}, 16,
                                            [f"{NAME}: tensor 'a': 8 bytes of data for shape [4] in F32 (16 expected)"]),
    "an entry without offsets": ({"a": {"dtype": "F32", "shape": [2]}, "b": _t("F32", [2], 8, 16)}, 16,
                                 [f"{NAME}: tensor 'a': entry must have exactly dtype, shape and data_offsets"]),
    # What the coverage check is for stays reported, beside a refused dtype too.
    "bytes hidden between tensors": ({"a": _t("F32", [2], 8, 16)}, 16, [f"{NAME}: 8 bytes at offset 0 belong to no tensor"]),
    "F64, and bytes hidden after it": ({"a": _t("F64", [2], 0, 16), "b": _t("F32", [2], 24, 32)}, 32,
                                       [f"{NAME}: tensor 'a': dtype 'F64' is not allowed (only F32, F16, BF16)",
                                        f"{NAME}: 8 bytes at offset 16 belong to no tensor"]),
    "F64 overlapping a tensor": ({"a": _t("F64", [2], 0, 16), "b": _t("F32", [2], 8, 16)}, 16,
                                [f"{NAME}: tensor 'a': dtype 'F64' is not allowed (only F32, F16, BF16)",
                                 f"{NAME}: tensor 'b' overlaps another tensor's data (offset 8 < 16)"]),
    # JSON dimensions have no bound: a size is computed only as far as 64-bit offsets go
    "a size past 2**64": ({"a": _t("F32", [2**32, 2**31], 0, 8)}, 8,
                          [f"{NAME}: tensor 'a': shape [4294967296, 2147483648] in F32 is larger than a safetensors "
                           "file can hold (2**64 bytes)"]),
    "a size of over 4300 digits": ({"a": _t("F32", [10**2500, 10**2500], 0, 8)}, 8,
                                   [f"{NAME}: tensor 'a': shape [2 dimensions, the largest 2501 digits long] in F32 is "
                                    "larger than a safetensors file can hold (2**64 bytes)"]),
    "a zero dimension beside a huge one": ({"a": _t("F32", [10**3000, 0], 0, 0), "b": _t("F32", [2], 0, 8)}, 8, []),
    "trailing bytes": ({"a": _t("F32", [2], 0, 8)}, 12, [f"{NAME}: 4 trailing bytes after the last tensor"]),
    "sound": ({"a": _t("F32", [2], 0, 8), "b": _t("BF16", [2], 8, 12)}, 12, []),
}


@pytest.mark.parametrize("header, data_len, problems", CASES.values(), ids=CASES.keys())
def test_each_problem_is_named_once(header: dict, data_len: int, problems: list[str]) -> None:
    assert check_safetensors(raw_safetensors(header, b"\0" * data_len), LIMITS, NAME) == problems
