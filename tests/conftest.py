import sys
from pathlib import Path

# Test helpers (multirank.py) import by plain name under pytest's importlib mode.
sys.path.insert(0, str(Path(__file__).parent))
