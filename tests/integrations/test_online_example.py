"""examples/online_fusion.py runs as a user runs it (plain loop, two local teachers of other
tokenizers, off- and on-policy steps): every step's loss is finite, on tokens the teachers scored."""
import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "online_fusion.py"


@pytest.mark.slow
def test_online_fusion_example_runs(vocab_dir, capsys):
    spec = importlib.util.spec_from_file_location("online_fusion_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "3", "--on-policy", "0.5", "--length", "32", "--prompt-tokens", "8",
                    "--max-new-tokens", "8", "--batch-size", "2"])
    steps = out["steps"]
    assert [s["on_policy"] for s in steps] == [False, False, True]      # random.Random(0): 0.84, 0.76, 0.42
    assert all(math.isfinite(s["loss"]) and s["tokens"] > 0 for s in steps)
    assert steps[2]["tokens"] <= 2 * 8                                    # only the sampled tokens count
    assert math.isfinite(out["held_out_ce"])
    assert "on -policy loss" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_online_section_runs(vocab_dir):
    """The README's "Online and on-policy fusion" example is complete: it runs as written."""
    import re

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Online and on-policy fusion", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert math.isfinite(scope["loss"].item()) and isinstance(scope["teachers"].sources, list)
