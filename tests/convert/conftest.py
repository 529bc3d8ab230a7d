"""The conversion tests' helpers (convert_runs) import by plain name; their corpus fixture,
text_corpus, is tests/conftest.py's."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # convert_runs
