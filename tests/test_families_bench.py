"""benchmarks/families.py end to end on CPU: three families of different kinds at ``--scale
tiny`` with ``--compiler eager`` (no code generation), each compiled plainly and through the
default velora_fx plan; the JSON and the markdown table say what the plan compressed."""
import json
import pathlib

import pytest
import torch

from script_loader import load_script

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("strict_pass")  # a pass bug fails the family instead of falling back

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "families.py"
FAMILIES = ["llama", "gpt2", "bert"]


def test_families_tiny(tmp_path):
    families = load_script(SCRIPT, "_bench_families")
    doc = families.main(["--scale", "tiny", "--compiler", "eager", "--families", *FAMILIES, "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "families.json").read_text())
    md = (tmp_path / "families.md").read_text()
    assert on_disk["command"].startswith("python benchmarks/families.py --scale tiny")
    assert on_disk["device"] == "cpu" and on_disk["versions"]["torch"] == torch.__version__

    records = {r["family"]: r for r in on_disk["records"]}
    assert list(records) == FAMILIES and len(doc["records"]) == len(FAMILIES)
    for name, r in records.items():
        assert r["status"] == "ok", (name, r.get("note"), r.get("traceback"))
        assert r["params"] > 0 and all(v["status"] == "ok" for v in r["variants"].values()), name
        plan = r["plan"]
        assert plan["sites"] > 0 and plan["compressed_sites"] == len(plan["compressed"]) > 0, name
        assert plan["saved_bytes_after"] <= plan["saved_bytes_before"], name
        # the default: VeLoRA where it pays, plus the near-exact codecs (few-bit, int8 gate/up)
        assert all(s["setting"].split()[0] in ("velora", "fewbit", "gated") for s in plan["compressed"]), name
        assert any(s["setting"].startswith("velora g=") for s in plan["compressed"]), name
        assert r["vs_inductor"]["ms_per_step"] > 0 and r["variants"]["velora_auto"]["first_step_s"] > 0, name
    assert "mlp.down_proj" in records["llama"]["plan"]["what"]

    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| family")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == FAMILIES
    assert on_disk["command"] in md
