"""The README's layout map names every module of the package, and only modules that exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "vllm_ascend" / "model_loader" / "netloader"


def layout_block() -> str:
    """The map's lines about the package (up to where the tests begin)."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Layout\n\n```\n(.*?)```", readme, re.S).group(1)
    return block.split("\ntests/", 1)[0]


def test_the_layout_map_names_every_module_and_sub_package():
    named = set(re.findall(r"([a-z_]+\.py)\b", layout_block()))
    modules = {p.name for p in PACKAGE.rglob("*.py")}
    sub_packages = {p.parent.name for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    assert modules - {"__init__.py"} <= named, sorted(modules - named - {"__init__.py"})
    assert named <= modules, sorted(named - modules)
    for name in sub_packages:
        assert f"{name}/" in layout_block(), name
