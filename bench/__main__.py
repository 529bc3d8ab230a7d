"""`make bench`: run every bench/bench_*.py in its own process; each prints a table whose last line is
its headline ratio against a baseline measured in the same run."""
import subprocess
import sys
from pathlib import Path


def main() -> int:
    selected = sys.argv[1:]
    failed = []
    for script in sorted(Path(__file__).parent.glob("bench_*.py")):
        if selected and script.stem not in selected:
            continue
        print(f"== {script.stem}", flush=True)
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(script.stem)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
