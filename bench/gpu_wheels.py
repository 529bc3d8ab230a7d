"""The wheels `make gpu-check` needs on an air-gapped GPU node, and the check of such a bundle.

The node (see shared/DESIGN.md) brings Python 3.12 with a CUDA build of torch, transformers,
sentencepiece, safetensors, tokenizers, mpi4py and pytest, and what those depend on; not deepspeed,
megatron-core or gridtrain, and no package registry. `make gpu-wheels`, on a machine with registry
access, writes into gpu-wheels/ a cp312-compatible wheel of each of those and of their own
dependencies the node lacks; the check installs them with `pip install --no-index`.

Usage: python bench/gpu_wheels.py build DIR | python bench/gpu_wheels.py verify DIR"""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the check imports that the node lacks, with what those need at run time that it lacks too.
# Versions are the ones requirements.txt pins (the tested stack).
BUNDLE = ("deepspeed", "megatron-core", "hjson", "py-cpuinfo", "pydantic", "pydantic_core", "annotated-types",
          "typing-inspection", "msgpack", "ninja", "einops", "psutil")
BUILT = ("deepspeed",)  # no binary wheel on the registry: a pure-Python one is built from the sdist
# Distributions an air-gapped node of that kind has (torch, transformers, ... and their requirements).
NODE_HAS = {"torch", "transformers", "sentencepiece", "safetensors", "tokenizers", "mpi4py", "pytest", "numpy",
            "packaging", "pyyaml", "tqdm", "filelock", "typing-extensions", "jinja2", "networkx", "sympy", "fsspec",
            "huggingface-hub", "regex", "requests", "setuptools", "triton", "pluggy", "iniconfig", "pygments",
            "markupsafe", "mpmath", "certifi", "idna", "urllib3", "charset-normalizer", "hf-xet"}
# gridtrain requirements the check does not import (it trains with logging.tensorboard false).
NOT_IMPORTED = {"tensorboard"}
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    """name -> version of requirements.txt."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def build(out: Path) -> None:
    """Write the bundle into `out` (an empty folder): gridtrain's own wheel, deepspeed built from
    its sdist, and the pinned binary wheels for CPython 3.12 on x86-64 Linux."""
    pins, pip = pinned(), [sys.executable, "-m", "pip"]
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)], check=True)
    for name in BUILT:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(out), f"{name}=={pins[normalize(name)]}"], check=True)
    binaries = [f"{name}=={pins[normalize(name)]}" for name in BUNDLE if name not in BUILT]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", *platforms,
                    "-d", str(out), *binaries], check=True)


def _compatible(tags) -> bool:
    """A wheel tag set CPython 3.12 on x86-64 Linux can install."""
    for tag in tags:
        minor = int(tag.interpreter[3:]) if re.fullmatch(r"cp3\d+", tag.interpreter) else None
        python_ok = tag.interpreter in ("py3", "cp312") or (tag.abi == "abi3" and minor is not None and minor <= 12)
        platform_ok = tag.platform == "any" or (tag.platform.startswith("manylinux") and tag.platform.endswith("x86_64"))
        if python_ok and tag.abi in ("none", "abi3", "cp312") and platform_ok:
            return True
    return False


def verify(folder: Path) -> list[str]:
    """Problems of a bundle: a wheel CPython 3.12 / x86-64 Linux cannot install, or a run-time
    requirement of a bundled package that neither the node nor the bundle provides."""
    from email.parser import Parser
    from zipfile import ZipFile

    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename

    problems, provided, requirements = [], NODE_HAS | NOT_IMPORTED, {}
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, _, _, tags = parse_wheel_filename(wheel.name)
        provided.add(normalize(name))
        if not _compatible(tags):
            problems.append(f"{wheel.name}: not installable on CPython 3.12, x86-64 Linux")
        with ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            message = Parser().parsestr(archive.read(metadata).decode("utf-8"))
        for line in message.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            env = {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
            if requirement.marker is None or requirement.marker.evaluate(env):
                requirements.setdefault(normalize(requirement.name), normalize(name))
    for needed in ("deepspeed", "megatron-core", "gridtrain"):
        if needed not in provided:
            problems.append(f"{needed}: no wheel in {folder}")
    for needed, wanted_by in sorted(requirements.items()):
        if needed not in provided:
            problems.append(f"{needed} (needed by {wanted_by}): neither on the node nor in {folder}")
    return problems


def main() -> int:
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "build":
        build(folder)
    problems = verify(folder)
    for problem in problems:
        print(f"gpu-wheels: {problem}", file=sys.stderr)
    if not problems:
        count = len(list(folder.glob("*.whl")))
        print(f"gpu-wheels: {count} wheels in {folder}, {sum(p.stat().st_size for p in folder.glob('*.whl')) / 1e6:.1f} MB")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
