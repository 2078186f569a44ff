"""README.md's "How a request flows" names the module of each step: it must match the code."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "addons" / "ocigate"


def flow_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## How a request flows")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def resolves(module: str, dotted: str) -> bool:
    found: object = importlib.import_module(f"ocigate.{module}")
    for name in dotted.split("."):
        if not hasattr(found, name):
            return False
        found = getattr(found, name)
    return True


def test_every_module_is_named_in_the_request_flow_and_every_module_named_exists() -> None:
    named = set(re.findall(r"`(\w+)\.py`", flow_section()))
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    assert named == modules, f"named but missing: {named - modules}; not named: {modules - named}"


def test_every_name_the_request_flow_gives_is_defined_where_it_says() -> None:
    section = flow_section()
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    # "`plan.py` (`make_plan`)": a name in the module just named; "`verify.StreamVerifier`": a module's name.
    pairs = re.findall(r"`(\w+)\.py`\s+\(`([\w.]+)`", section)
    pairs += [(m, n) for m, n in re.findall(r"`(\w+)\.([A-Za-z_][\w.]*)`", section) if m in modules and n != "py"]
    assert len(pairs) >= 8  # the section names the functions and types of the main steps
    missing = [f"{module}.{name}" for module, name in pairs if not resolves(module, name)]
    assert not missing
