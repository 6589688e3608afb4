"""nbval compares the notebooks' outputs to one unit of each number's last printed digit.

The CI copies in tests/notebooks hold numbers to the third decimal. The same code and seeds give
float32 results whose last bits depend on the CPU (an Intel Xeon with AVX-512 and an AMD EPYC
differ in the tiny CI models' weights after a few training steps, even with MKL, ATen and oneDNN
pinned to their AVX2 paths), and about one printed bootstrap endpoint in a hundred then moves by
one unit of its last digit (+0.181 vs +0.182). Everything else must match exactly: the text
between numbers, the count of numbers, each number's format (digits after the point, exponent),
and every number within one unit of its last digit. A change of two units fails.
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal, InvalidOperation

NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?:[eE][-+]?\d+)?(?![\w.])")


def _unit(token: str) -> Decimal:
    """One unit of the token's last printed digit (0.001 for '-0.195', 1e-07 for '1.23e-05')."""
    return Decimal(1).scaleb(Decimal(token).as_tuple().exponent)


def _format(token: str) -> tuple[int, bool]:
    """Digits after the point, and whether the token has an exponent."""
    mantissa = re.split("[eE]", token)[0]
    return len(mantissa.split(".")[1]), mantissa != token


def _close(ref: str, test: str) -> bool:
    """Two number tokens (from NUMBER) have the same format and differ by at most one unit of
    the last digit."""
    if _format(ref) != _format(test):
        return False
    try:
        return abs(Decimal(ref) - Decimal(test)) <= _unit(ref)
    except InvalidOperation:
        return False


def align_text(ref: str, test: str) -> str:
    """`test` with each number that is within one unit of the reference's replaced by the
    reference's token; `test` unchanged where the text around the numbers differs."""
    ref_parts, test_parts = NUMBER.split(ref), NUMBER.split(test)
    if ref_parts != test_parts:
        return test
    ref_nums, test_nums = NUMBER.findall(ref), NUMBER.findall(test)
    out = [test_parts[0]]
    for r, t, tail in zip(ref_nums, test_nums, test_parts[1:]):
        out += [r if r != t and _close(r, t) else t, tail]
    return "".join(out)


def _align_value(ref, test):
    """Strings aligned; a list of strings (nbformat's multi-line form) aligned as one text."""
    if isinstance(ref, str) and isinstance(test, str):
        return align_text(ref, test)
    if isinstance(ref, list) and isinstance(test, list) and all(isinstance(s, str) for s in ref + test):
        joined = align_text("".join(ref), "".join(test))
        return test if joined == "".join(test) else [joined]
    return test


def align_outputs(ref: list, test: list, sanitize=lambda s: s) -> tuple[list, list]:
    """Copies of the reference and test outputs (nbformat output dicts), both sanitized as nbval
    sanitizes them, the test's numbers within one unit of the reference's made equal to them.
    Outputs are paired by position and by key; unpaired ones are left as they are."""
    ref, test = copy.deepcopy(ref), copy.deepcopy(test)
    for r, t in zip(ref, test):
        for key in set(r) & set(t):
            if key == "data":
                for mime in set(r["data"]) & set(t["data"]):
                    r["data"][mime] = _sanitized(r["data"][mime], sanitize)
                    t["data"][mime] = _align_value(r["data"][mime], _sanitized(t["data"][mime], sanitize))
            elif key == "text":
                r["text"] = _sanitized(r["text"], sanitize)
                t["text"] = _align_value(r["text"], _sanitized(t["text"], sanitize))
    return ref, test


def _sanitized(value, sanitize):
    if isinstance(value, str):
        return sanitize(value)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [sanitize("".join(value))]
    return value


def install() -> None:
    """Make nbval's cell comparison accept numbers within one unit of their last printed digit:
    an exact comparison first; where it fails, again with the test outputs aligned."""
    from nbval.plugin import IPyNbCell

    if getattr(IPyNbCell.compare_outputs, "_last_digit", False):
        return
    exact = IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        if exact(self, test, ref, skip_compare):
            return True
        failure = self.comparison_traceback
        ref_s, test_s = align_outputs(ref, test, self.sanitize)  # nbval sanitizes both again: alike
        if exact(self, test_s, ref_s, skip_compare):
            return True
        self.comparison_traceback = failure
        return False

    compare_outputs._last_digit = True
    IPyNbCell.compare_outputs = compare_outputs
