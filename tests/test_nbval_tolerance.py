"""The notebooks' regression comparison: exact except one unit of a number's last printed digit."""

from __future__ import annotations

import nbformat
import pytest
from nbval.plugin import IPyNbCell
from nbval_tolerance import align_outputs, align_text, install

ROW = "2    -0.001 [-0.195, +0.182]    1    1\n3    -0.007 [-0.209, +0.201]"


@pytest.mark.parametrize("test, same", [
    (ROW, True),
    (ROW.replace("+0.182", "+0.181"), True),  # one unit: the CPUs' last-bit spread
    (ROW.replace("+0.182", "+0.183").replace("-0.209", "-0.210"), True),
    (ROW.replace("+0.182", "+0.184"), False),  # two units: a change
    (ROW.replace("+0.182", "+0.172"), False),
    (ROW.replace("+0.182", "+0.18"), False),  # another format
    (ROW.replace("+0.182", "+0.1820"), False),
    (ROW.replace("    1    1", "    1    2"), False),  # integers are exact
    (ROW.replace("-0.001", "-0.002").replace("[", "("), False),  # other text
    (ROW + " 0.5", False),  # another count of numbers
])
def test_align_text_accepts_one_unit_of_the_last_digit_only(test, same):
    assert (align_text(ROW, test) == ROW) is same


def test_scientific_numbers_have_their_own_unit():
    assert align_text("p = 1.23e-05", "p = 1.24e-05") == "p = 1.23e-05"
    assert align_text("p = 1.23e-05", "p = 1.25e-05") == "p = 1.25e-05"
    assert align_text("p = 1.23e-05", "p = 1.24e-06") == "p = 1.24e-06"


def _outputs(text: str) -> list:
    return [nbformat.v4.new_output("display_data", data={"text/plain": text, "text/html": f"<td>{text}</td>"}),
            nbformat.v4.new_output("stream", name="stdout", text=[text[:9], text[9:]])]


def test_outputs_are_aligned_after_sanitizing_both_sides_alike():
    dup = lambda s: s.replace("0x", "0x0x")  # noqa: E731  (a sanitizer that is not idempotent)
    ref, test = _outputs(ROW + " at 0x1f"), _outputs(ROW.replace("+0.182", "+0.181") + " at 0x1f")
    ref_s, test_s = align_outputs(ref, test, dup)
    assert test_s == ref_s and "0x0x1f" in ref_s[0]["data"]["text/plain"]
    assert test[0]["data"]["text/plain"] != ref[0]["data"]["text/plain"]  # the inputs are kept
    _, far = align_outputs(ref, _outputs(ROW.replace("+0.182", "+0.185") + " at 0x1f"), dup)
    assert far != ref_s


class _Cell:
    """What compare_outputs uses of an nbval cell."""

    class parent:  # noqa: N801
        skip_compare = ("metadata", "traceback", "output_type", "name", "execution_count")
        sanitize_patterns = {}
    colors = type("C", (), {k: "" for k in ("FAIL", "OKBLUE", "OKGREEN", "ENDC")})()
    sanitize = IPyNbCell.sanitize

    def format_output_compare(self, key, left, right):  # nbval's report needs pytest's hooks
        self.comparison_traceback.append(key)


@pytest.mark.parametrize("edit, same", [("+0.181", True), ("+0.183", True), ("+0.184", False), ("+0.280", False)])
def test_installed_comparison_fails_beyond_one_unit(edit, same):
    install()
    install()  # installing twice wraps once
    ref = _outputs(ROW)
    assert IPyNbCell.compare_outputs(_Cell(), _outputs(ROW.replace("+0.182", edit)), ref) is same
    assert IPyNbCell.compare_outputs(_Cell(), _outputs(ROW.replace("    1    1", "    1    0")), ref) is False
