"""The throughput benchmark runs on the CPU from its README command, with tiny settings, and prints its table."""
import json

from conftest import run_script


def test_benchmark_prints_the_table(tmp_path):
    result = run_script("benchmarks/throughput.py", "--images", 12, "--classes", 4, "--min-px", 64, "--max-px", 160,
                        "--sizes", 32, "--bs", 4, "--warmup", 1, "--steps", 2, "--workers", 0,
                        "--json", tmp_path / "r.json", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    assert {r["mode"] for r in rows} == {"ceiling", "project", "plain", "loader", "loader_nodraft", "project_resized",
                                        "loader_resized", "score_project", "score_plain"}
    assert all(r["images_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert "project/plain" in result.stdout and "project/ceiling" in result.stdout and "draft/nodraft" in result.stdout
    assert "resized/full-size" in result.stdout
