"""benchmarks/profile_overhead.py: the per-operator excess by hand, and its --quick mode."""

import pytest


@pytest.mark.train
def test_profile_overhead_excess_per_operator_and_quick_run(capsys, load_script):
    profile = load_script("profile_overhead")
    from collections import Counter

    per_op = {
        "student": Counter({"conv": 10.0, "bn": 2.0}),
        "teacher": Counter({"conv": 4.0}),
        "distill": Counter({"conv": 15.0, "bn": 2.5, "kl": 3.0}),
    }
    rows = profile.overhead_by_operator(per_op)
    assert [r[0] for r in rows] == ["kl", "conv", "bn"]  # by |distill - student - teacher|
    assert rows[0] == ("kl", 3.0, 0.0, 0.0, 3.0)
    assert rows[1][1] == pytest.approx(1.0) and rows[2][1] == pytest.approx(0.5)
    assert profile.main(["fitnet", "--quick", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "distill - student - teacher" in out and "aten::" in out
