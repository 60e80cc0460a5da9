"""The one-way imports inside lmjobs: fine-tuning never imports RLHF (RLHF loads fine-tuned reward
models, so the other direction would make a cycle); the shared preference losses import neither."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_finetune_never_imports_rlhf_and_the_preference_losses_import_neither():
    finetune = {f.name: _imports(f) for f in (ROOT / "lmjobs/finetune").glob("*.py")}
    offenders = {name: sorted(i for i in found if i.startswith("lmjobs.rlhf")) for name, found in finetune.items()}
    assert not any(offenders.values()), offenders
    shared = _imports(ROOT / "lmjobs/preference.py")
    assert not [i for i in shared if i.startswith(("lmjobs.rlhf", "lmjobs.finetune", "ray", "deepspeed"))], shared
    # both sides use the one module
    assert "lmjobs.preference" in _imports(ROOT / "lmjobs/finetune/tasks.py")
