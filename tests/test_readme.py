"""The README's Python examples run as written (with smaller sizes, so the suite stays fast)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_python_examples():
    blocks = _python_blocks()
    assert len(blocks) == 2 and "mmil.models" in blocks[0] and "prunelimit" in blocks[1]


def test_mmil_model_example_runs():
    code = _python_blocks()[0].replace("5000", "300").replace("3000", "200").replace("1024", "16")
    namespace: dict = {}
    exec(compile(code, "README.md (mmil model)", "exec"), namespace)
    model = namespace["model"]
    out = namespace["out"]
    assert out.logits.shape == (2, 2) and out.instance_scores.shape == (2, 300)
    assert not model.training  # the example puts the model in eval mode, so the same seed gives the same output
    again = model(namespace["x"], namespace["mask"], seed=0, return_scores=True)
    assert (again.logits == out.logits).all()


def test_prunelimit_python_example_runs(capsys):
    code = _python_blocks()[1].replace("epochs=30", "epochs=3").replace("num_steps=100", "num_steps=20")
    exec(compile(code, "README.md (prunelimit)", "exec"), {})
    printed = capsys.readouterr().out
    predicted, actual = map(float, re.findall(r"predicted ([\d.]+), actual ([\d.]+)", printed)[0])
    assert 0.0 < predicted < 1.0 and 0.0 <= actual < 1.0
