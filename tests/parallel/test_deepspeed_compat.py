"""The supported DeepSpeed version is one fact: pyproject pins it, start-up checks it."""
import re
import subprocess
import sys
from pathlib import Path

from gridtrain.parallel.deepspeed_compat import SUPPORTED_DEEPSPEED, check_deepspeed_version, version_problem

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_pins_the_version_the_check_accepts():
    pins = re.findall(r'"deepspeed==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [SUPPORTED_DEEPSPEED]
    assert f"deepspeed=={SUPPORTED_DEEPSPEED}" in (ROOT / "requirements.txt").read_text()


def test_an_untested_version_is_refused_with_one_line():
    check_deepspeed_version()  # the installed one passes
    assert version_problem(SUPPORTED_DEEPSPEED) is None
    message = version_problem("0.17.1")
    assert message == (f"deepspeed 0.17.1 is installed; gridtrain supports deepspeed {SUPPORTED_DEEPSPEED} only "
                       "(its uses of DeepSpeed internals were checked against it): "
                       f"pip install deepspeed=={SUPPORTED_DEEPSPEED}")
    assert version_problem(None).startswith("deepspeed is not installed;")


def test_the_check_imports_no_deepspeed():
    code = ("import sys; from gridtrain.parallel.deepspeed_compat import check_deepspeed_version; "
            "check_deepspeed_version(); print('deepspeed' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
