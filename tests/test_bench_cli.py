"""The benchmark report's pieces that need no timing: the table, --compare, the README section."""
import json

from fastsd.bench.__main__ import compare, format_table, write_readme
from fastsd.bench.core import Row


def _rows(scale=1.0):
    return [Row("patch_swap", "c", "cpp", "backend", 2.0 * scale, 0.1, 3.0, 0.0, 1.0, 1, 6.0, {"clone": 0.5}),
            Row("patch_swap", "c", "clone", "baseline", 1.0, 0.1, 6.0, None, 1.0, 1, 6.0)]


def test_table_lists_every_row_and_column():
    text = format_table(_rows(), copy_gbps=10.0)
    assert "cpp" in text and "clone*" in text and "x vs clone" in text and "0.50" in text and "30%" in text
    assert "% copy" in text


def test_table_share_is_of_the_theoretical_peak_where_known():
    text = format_table(_rows(), copy_gbps=10.0, peak_gbps=100.0)
    assert "% peak" in text and "% copy" not in text and "3%" in text and "6%" in text


def test_compare_flags_a_regression_beyond_threshold(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [r.__dict__ for r in _rows()]}))
    assert compare(_rows(1.1), str(old), threshold=1.25) == 0
    assert compare(_rows(1.5), str(old), threshold=1.25) == 1
    assert "REGRESSION" in capsys.readouterr().out


def test_readme_section_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\noutro\n")
    env = dict(date="2026-11-22T00:00:00", device="cpu", cpu="X", cores=2, torch_threads=2, torch="2.x",
               commit="abc", copy_gbps=10.0)
    write_readme(str(readme), env, "float32", "NEW TABLE")
    text = readme.read_text()
    assert "old table" not in text and "NEW TABLE" in text and text.startswith("intro") and text.endswith("outro\n")


def test_peak_cpu_memory_follows_allocations_and_frees_in_order():
    import torch

    from fastsd.bench.traffic import peak_cpu_memory

    n = 1_000_000  # 4 MB of float32

    def two_live():  # a and b live together, then a is freed before c is made
        a = torch.empty(n)
        b = a * 2
        del a
        return b + 1

    def one_live():
        a = torch.empty(n)
        del a
        return torch.empty(n)

    assert 8_000_000 <= peak_cpu_memory(two_live) < 8_001_000
    assert 4_000_000 <= peak_cpu_memory(one_live) < 4_001_000
