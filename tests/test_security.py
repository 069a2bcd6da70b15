"""Security: no pickle of files a user did not create, no code from config, quoted shell commands.

* A static audit (:func:`audit_python`, on the syntax tree, not on the text) of the package and
  of the workflow's Python (the Snakefile and rule files as Snakemake compiles them): every
  ``torch.load`` passes ``weights_only=True``; nothing passes ``allow_pickle=True`` (numpy's
  default is False since 1.16.3 and pyproject requires numpy >= 2, so a bare ``np.load`` is
  safe and not required to say so); no pickle-family module is imported; no ``eval``, ``exec``
  or ``compile``; no ``yaml.load`` without a safe loader; no shell through ``subprocess`` or
  ``os.system``; no pandas pickles. The audit is itself tested on planted unsafe snippets.
* Behaviour: an armed pickle (unpickling it creates a marker file) inside a checkpoint, a resume
  file, an encoder weights file, a ``.npy`` array or a stacking model file is refused, and the
  marker never appears; the same payload does create it when unpickled on purpose.
* Shell: every value a rule's shell command interpolates is quoted (``{x:q}``, or built by
  ``common.smk``'s ``cli_flags``, which quotes each value); a run whose ``results_dir`` and
  demo folder hold quotes, ``$(...)``, backticks and ``;`` executes nothing of them.
"""

from __future__ import annotations

import ast
import io
import logging
import os
import pickle
import re
import shlex
import string
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO_ROOT, copy_workflow, run_snakemake

from segflow.artifacts.predictions import read_oof
from segflow.core.errors import SegflowError
from segflow.ensemble.stacking.learners import load_classifier, make_classifier
from segflow.model.models import CHECKPOINT_FORMAT, ModelSpec, build_model, load_checkpoint
from segflow.model.training.checkpointing import load_resume

PACKAGE = REPO_ROOT / "src" / "segflow"
WORKFLOW_FILES = [
    REPO_ROOT / "Snakefile",
    *sorted((REPO_ROOT / "workflow" / "rules").glob("*.smk")),
]

# ------------------------------------------------------------------------- the static audit

PICKLE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "cloudpickle",
    "dill",
    "joblib",
    "jsonpickle",
    "marshal",
    "shelve",
}
CODE_BUILTINS = {"eval", "exec", "compile", "__import__"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
UNSAFE_YAML_CALLS = {
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
}
SHELL_CALLS = {
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
CODE_LOADERS = {"torch.hub.load", "torch.jit.load"}  # run code shipped with the file


class _Auditor(ast.NodeVisitor):
    """Collects findings; names are resolved through the module's imports (aliases included,
    and imports inside functions, which segflow uses for heavy modules)."""

    def __init__(self, tree: ast.AST, filename: str) -> None:
        self.filename = filename
        self.findings: list[str] = []
        self.aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.aliases[alias.asname] = alias.name
                    else:  # `import os.path` binds `os`
                        top = alias.name.split(".")[0]
                        self.aliases[top] = top
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def flag(self, node: ast.AST, message: str) -> None:
        self.findings.append(f"{self.filename}:{getattr(node, 'lineno', '?')}: {message}")

    def dotted(self, node: ast.AST) -> str | None:
        """``np.load`` -> ``numpy.load``; None for anything but a (dotted) name."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in PICKLE_MODULES:
                self.flag(node, f"imports {alias.name} (pickle-family serialisation)")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.module.split(".")[0] in PICKLE_MODULES:
            self.flag(node, f"imports from {node.module} (pickle-family serialisation)")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in ("read_pickle", "to_pickle"):
            self.flag(node, f"uses {node.attr} (pandas pickles)")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if self.aliases.get(node.id, "").endswith(("read_pickle", "to_pickle")):
            self.flag(node, f"uses {self.aliases[node.id]} (pandas pickles)")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.dotted(node.func) or ""
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        unpacked = any(k.arg is None for k in node.keywords)
        if isinstance(node.func, ast.Name) and name in CODE_BUILTINS:
            self.flag(node, f"calls {name}()")
        if name in {f"builtins.{b}" for b in CODE_BUILTINS}:
            self.flag(node, f"calls {name}()")
        if name in TORCH_LOADS and not _is_constant(keywords.get("weights_only"), True):
            self.flag(node, f"{name} without weights_only=True")
        if name in CODE_LOADERS:
            self.flag(node, f"calls {name} (loads code with the weights)")
        if "allow_pickle" in keywords and not _is_constant(keywords["allow_pickle"], False):
            self.flag(node, f"{name or 'a call'} with allow_pickle other than False")
        if name == "numpy.load" and unpacked:
            self.flag(node, "numpy.load(**kwargs): allow_pickle cannot be checked")
        if name in ("yaml.load", "yaml.load_all"):
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or self.dotted(loader) not in SAFE_YAML_LOADERS:
                self.flag(node, f"{name} without a safe Loader (use yaml.safe_load)")
        if name in UNSAFE_YAML_CALLS:
            self.flag(node, f"calls {name}")
        if name in SHELL_CALLS:
            self.flag(node, f"calls {name} (runs a shell)")
        if name.startswith("subprocess.") and (
            unpacked or ("shell" in keywords and not _is_constant(keywords["shell"], False))
        ):
            self.flag(node, f"{name} with shell=True (or unverifiable keyword arguments)")
        self.generic_visit(node)


def _is_constant(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def audit_python(source: str, filename: str = "<snippet>") -> list[str]:
    """Unsafe deserialisation, code execution and shell use in Python ``source``."""
    tree = ast.parse(source, filename)
    auditor = _Auditor(tree, filename)
    auditor.visit(tree)
    return auditor.findings


def compiled_workflow(path: Path) -> str:
    """A Snakefile or rule file as the Python that Snakemake compiles it to (rules become
    ``@workflow.rule`` / ``@workflow.shellcmd(...)`` decorated functions)."""
    from snakemake.parser import parse

    source = SimpleNamespace(get_path_or_uri=lambda secret_free=True: str(path))
    workflow = SimpleNamespace(
        sourcecache=SimpleNamespace(open=lambda _: io.StringIO(path.read_text()))
    )
    code, _ = parse(source, workflow, {})
    return code


def test_the_package_passes_the_audit() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30  # the whole package, not an empty glob
    findings = [
        f for m in modules for f in audit_python(m.read_text(), str(m.relative_to(REPO_ROOT)))
    ]
    assert findings == []


def test_the_workflow_passes_the_audit() -> None:
    """Snakefile and rule files, common.smk's helpers included: no eval/exec of config."""
    findings = []
    for path in WORKFLOW_FILES:
        code = compiled_workflow(path)
        findings += audit_python(code, str(path.relative_to(REPO_ROOT)))
    assert findings == []
    # The compiled code is what the audit read: it holds every rule and its shell command.
    assert sum(len(_rules(compiled_workflow(p))) for p in WORKFLOW_FILES) >= 16


UNSAFE_SNIPPETS = {
    "import-pickle": "import pickle\npickle.loads(data)",
    "lazy-import-pickle": "def f(data):\n    import pickle\n    return pickle.loads(data)",
    "import-dill": "import dill as d",
    "from-joblib": "from joblib import load\nload('model.joblib')",
    "import-shelve": "import shelve",
    "import-marshal": "import marshal",
    "torch-load-default": "import torch\ntorch.load('m.pt')",
    "torch-load-false": "import torch\ntorch.load('m.pt', weights_only=False)",
    "torch-load-alias": "import torch as t\nt.load(path, map_location='cpu')",
    "torch-load-imported": "from torch import load\nload('m.pt', map_location='cpu')",
    "torch-load-variable": "import torch\ntorch.load('m.pt', weights_only=flag)",
    "torch-hub": "import torch\ntorch.hub.load('repo', 'model')",
    "np-load-pickle": "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "np-load-pickle-variable": "import numpy\nnumpy.load('a.npy', allow_pickle=config['p'])",
    "np-load-kwargs": "import numpy as np\nnp.load('a.npy', **options)",
    "pandas-read-pickle": "import pandas as pd\npd.read_pickle('f.pkl')",
    "pandas-read-pickle-imported": "from pandas import read_pickle\nread_pickle('f.pkl')",
    "pandas-to-pickle": "frame.to_pickle('f.pkl')",
    "eval": "value = eval(config['expression'])",
    "exec": "exec(config['code'])",
    "compile": "code = compile(text, 'f', 'exec')",
    "builtins-eval": "import builtins\nbuiltins.eval('1')",
    "yaml-load": "import yaml\nyaml.load(text)",
    "yaml-load-full-loader": "import yaml\nyaml.load(text, Loader=yaml.FullLoader)",
    "yaml-load-positional": "import yaml\nyaml.load(text, yaml.Loader)",
    "yaml-unsafe-load": "import yaml\nyaml.unsafe_load(text)",
    "subprocess-shell": "import subprocess\nsubprocess.run(command, shell=True)",
    "popen-shell": "from subprocess import Popen\nPopen(command, shell=True)",
    "subprocess-shell-variable": "import subprocess\nsubprocess.call(command, shell=use_shell)",
    "os-system": "import os\nos.system('ls ' + path)",
}


@pytest.mark.parametrize("source", UNSAFE_SNIPPETS.values(), ids=UNSAFE_SNIPPETS.keys())
def test_the_audit_flags_each_planted_unsafe_pattern(source: str) -> None:
    findings = audit_python(source)
    assert len(findings) >= 1, source


def test_the_audit_accepts_the_safe_forms() -> None:
    safe = """
import re
import subprocess
import numpy as np
import pandas as pd
import torch
import yaml

torch.load(path, map_location="cpu", weights_only=True)
np.load(path, mmap_mode="r")
np.load(path, allow_pickle=False)
pd.read_parquet(path)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
subprocess.run(["ls", path], check=True)
subprocess.run(["ls"], shell=False)
model.eval()
re.compile("x")
"""
    assert audit_python(safe) == []


# ------------------------------------------------------------------- armed pickles are refused


class ArmedPayload:
    """Unpickling this object calls ``open(marker, "w")``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _armed_checkpoints(marker: Path) -> dict[str, object]:
    """Checkpoint-shaped payloads with the armed object at several depths."""
    spec = {"arch": "Unet", "encoder": "resnet18", "in_channels": 1, "classes": 1}
    return {
        "top-level": ArmedPayload(marker),
        "in-metadata": {
            "format": CHECKPOINT_FORMAT,
            "spec": spec,
            "state_dict": {},
            "extra": ArmedPayload(marker),
        },
        "in-state-dict": {
            "format": CHECKPOINT_FORMAT,
            "spec": spec,
            "state_dict": {"encoder.conv1.weight": ArmedPayload(marker)},
        },
    }


def test_the_armed_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """Control: without weights_only the same file creates the marker, so the refusals below
    are what keeps it from appearing."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pt"
    torch.save(_armed_checkpoints(marker)["in-metadata"], path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["top-level", "in-metadata", "in-state-dict"])
def test_a_model_checkpoint_holding_a_pickled_object_is_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pt"
    torch.save(_armed_checkpoints(marker)[where], path)
    with pytest.raises(
        SegflowError, match=r"model\.pt: not a readable checkpoint.*(Unsupported global|weights)"
    ):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_resume_file_holding_a_pickled_object_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "last.pt"
    torch.save(
        {"format": "segflow-resume-1", "config_hash": "h", "evil": ArmedPayload(marker)}, path
    )
    with caplog.at_level(logging.WARNING, logger="segflow.model.training.checkpointing"):
        assert load_resume(path, "h") is None
    assert "unreadable resume file ignored" in caplog.text and str(path) in caplog.text
    assert not marker.exists()


def test_encoder_weights_holding_a_pickled_object_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "encoder.pth"
    torch.save({"conv1.weight": ArmedPayload(marker)}, path)
    spec = ModelSpec(arch="Unet", encoder="resnet18", encoder_weights=str(path))
    with pytest.raises(SegflowError, match=r"encoder_weights: .*not a readable state dict"):
        build_model(spec)
    assert not marker.exists()


def test_an_object_array_of_predictions_is_refused(tmp_path: Path) -> None:
    """Probability arrays are read with allow_pickle off: a pickled .npy does not load."""
    marker = tmp_path / "PWNED"
    armed = np.empty(2, dtype=object)
    armed[0] = ArmedPayload(marker)
    np.save(tmp_path / "oof_probs.npy", armed, allow_pickle=True)
    pd.DataFrame({"id": ["a", "b"]}).to_csv(tmp_path / "oof_ids.csv", index=False)
    with pytest.raises(ValueError, match=r"Python objects|allow_pickle"):
        read_oof(tmp_path)
    assert not marker.exists()
    np.load(tmp_path / "oof_probs.npy", allow_pickle=True)  # control: the file is armed
    assert marker.exists()


@pytest.mark.parametrize("backend", ["lightgbm", "catboost"])
def test_stacking_models_are_native_files_and_a_pickle_is_not_loaded(
    tmp_path: Path, backend: str
) -> None:
    rng = np.random.default_rng(0)
    features = pd.DataFrame({"x0": rng.normal(size=60), "x1": rng.normal(size=60)})
    target = (features["x0"] > 0).astype(int).to_numpy()
    params = {"num_iterations": 5} if backend == "lightgbm" else {"iterations": 5}
    model = make_classifier(backend, params).fit(features, target)
    path = model.save(tmp_path / f"model{model.suffix}")
    head = path.read_bytes()[:64]
    assert not head.startswith(b"\x80")  # pickle protocol 2+ opcode PROTO
    if backend == "lightgbm":
        assert head.startswith(b"tree\n")  # LightGBM's text format
    else:
        assert head.startswith(b"CBM1")  # CatBoost's binary model format
    np.testing.assert_array_equal(
        load_classifier(path).predict_proba(features), model.predict_proba(features)
    )

    marker = tmp_path / "PWNED"
    planted = tmp_path / "planted" / f"model{model.suffix}"
    planted.parent.mkdir()
    planted.write_bytes(pickle.dumps(ArmedPayload(marker)))
    with pytest.raises(Exception):  # noqa: B017 (each library has its own parse error)
        load_classifier(planted)
    assert not marker.exists()


# ----------------------------------------------------------------------------- shell quoting

# Interpolations that need no quoting: Snakemake integers, and flags that common.smk renders
# with every value already shlex-quoted (cli_flags, via section_flags / dicom_flags;
# pseudo_flags; init_flags; submit_flag; budget_flags; resolution_flags).
SAFE_UNQUOTED = {"threads", "resources.gpu_slots"}
PRE_QUOTED = {
    "params.flags": "section_flags",
    "params.dicom": "dicom_flags",
    "params.pseudo": "pseudo_flags",
    "params.init": "init_flags",
    "params.force": "submit_flag",
    "params.budget": "budget_flags",
    "params.resolution": "resolution_flags",
    "params.near": "near_duplicate_flags",
    "params.watershed": "watershed_flags",
    "params.test_flags": "ingest_test_flags",
    "params.predict_options": "section_flags",
    "params.submission_options": "section_flags",
    "params.export_options": "section_flags",
    "params.stack_options": "stack_flags",
    "params.stack_base": "stack_base_flags",
    "params.apply_base": "apply_stack_base_flags",
}


def _rules(code: str) -> dict[str, dict[str, object]]:
    """rule name -> {"shell": its command template, "params": {name: value expression}}."""
    rules: dict[str, dict[str, object]] = {}
    for node in ast.walk(ast.parse(code)):
        if not isinstance(node, ast.FunctionDef):
            continue
        info: dict[str, object] = {"params": {}}
        for decorator in node.decorator_list:
            if not isinstance(decorator, ast.Call):
                continue
            kind = ast.unparse(decorator.func)
            if kind == "workflow.rule":
                info["name"] = next(k.value.value for k in decorator.keywords if k.arg == "name")
            elif kind == "workflow.shellcmd":
                info["shell"] = decorator.args[0].value
            elif kind == "workflow.params":
                info["params"] = {k.arg: k.value for k in decorator.keywords}
        if "name" in info and "shell" in info:
            rules[str(info["name"])] = info
    return rules


def test_every_interpolated_value_in_a_shell_command_is_quoted() -> None:
    rules = {}
    for path in WORKFLOW_FILES:
        rules.update(_rules(compiled_workflow(path)))
    assert len(rules) >= 15 and "train_fold" in rules and "submit" in rules
    problems = []
    for name, info in rules.items():
        for _, field, spec, _ in string.Formatter().parse(info["shell"]):
            if field is None or field in SAFE_UNQUOTED:
                continue
            if field in PRE_QUOTED:
                value = info["params"].get(field.split(".", 1)[1])
                builder = ast.unparse(value.func if isinstance(value, ast.Call) else value)
                if builder != PRE_QUOTED[field]:
                    problems.append(
                        f"{name}: {field} is built by {builder}, not {PRE_QUOTED[field]}"
                    )
            elif not (spec or "").endswith("q"):
                problems.append(f"{name}: {{{field}}} is not quoted (use {{{field}:q}})")
    assert problems == []


def active_metacharacters(command: str) -> list[tuple[int, str]]:
    """Positions of characters that bash would act on rather than pass on literally.

    Outside quotes: ``; & | ( ) < > $ ` \\n``, glob and brace characters, ``~`` and ``#`` at
    the start of a word; inside double quotes: ``$`` and backtick. Single quotes make
    everything literal.
    """
    found = []
    state = None
    index = 0
    while index < len(command):
        char = command[index]
        word_start = index == 0 or command[index - 1] in " \t"
        if state == "'":
            if char == "'":
                state = None
        elif state == '"':
            if char == "\\":
                index += 1
            elif char == '"':
                state = None
            elif char in "$`":
                found.append((index, char))
        elif char == "\\":
            index += 1
        elif char in "'\"":
            state = char
        elif char in ";&|()<>$`\n*?[{" or (char in "~#" and word_start):
            found.append((index, char))
        index += 1
    if state is not None:
        found.append((len(command), f"unterminated {state}"))
    return found


def _only_the_log_redirect(command: str) -> bool:
    found = active_metacharacters(command)
    return (
        len(found) == 1
        and found[0][1] == ">"
        and command[found[0][0] - 2 : found[0][0] + 2] == " 2> "
    )


def test_the_metacharacter_scan_sees_unquoted_and_double_quoted_expansions() -> None:
    assert _only_the_log_redirect("segflow x --out 'a b;$(c)' --n 2 2> 'log'")
    assert _only_the_log_redirect("segflow x --out 'it'\"'\"'s' 2> log")
    assert not _only_the_log_redirect("segflow x --out res $(touch I) 2> log")
    assert not _only_the_log_redirect('segflow x --out "res $(touch I)" 2> log')
    assert not _only_the_log_redirect("segflow x --out res;touch I 2> log")
    assert not _only_the_log_redirect("segflow x --out a #b 2> log")
    assert not _only_the_log_redirect("segflow x --out 'a 2> log")


# A results folder and a demo folder named to break out of an unquoted command in every way.
EVIL_RESULTS = "res #1 it's $(touch INJECTED) `touch INJECTED3`;touch INJECTED2 & x|y"
EVIL_DEMO = "dem o'$(touch INJECTED4);touch INJECTED5"
MARKERS = {f"INJECTED{suffix}" for suffix in ("", "2", "3", "4", "5")}
EVIL_CONFIG = {
    "results_dir": EVIL_RESULTS,
    "demo": {"n_train": 40, "n_test": 10, "seed": 5, "out_dir": EVIL_DEMO},
    "data": {
        "train_images": f"{EVIL_DEMO}/train/images",
        "test_images": f"{EVIL_DEMO}/test/images",
        "rle_csv": f"{EVIL_DEMO}/train.csv",
        "metadata_csv": f"{EVIL_DEMO}/metadata.csv",
    },
    "preprocess": {"height": 32, "width": 32},
    "folds": {"n_folds": 2},
    "pseudo": {"rounds": 1},  # every rule of the DAG, select_pseudo included
    "experiments": {"unet_lite0": {"train": {"epochs": 1}}},
    "submit_experiment": "unet_lite0:0",  # choose's --force flag is rendered too
}


def _markers_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name in MARKERS]


@pytest.fixture(scope="module")
def evil_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("evil") / "workflow")
    (workdir / "evil.yaml").write_text(yaml.safe_dump(EVIL_CONFIG))
    return workdir


def _dry_run_jobs(output: str) -> tuple[list[tuple[str, str]], set[str]]:
    """(rule, shell command) of every job a ``--dry-run --printshellcmds`` prints, and the
    rules of its job table."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    planned = set(re.findall(r"^(\w+)\s+\d+\s*$", table, flags=re.M)) - {"total"}
    jobs = []
    for block in re.split(r"^\[[^\]\n]*\]$", output, flags=re.M)[1:]:
        rule = re.match(r"\s*(?:local)?rule (\w+):", block)
        shell = re.search(r"^Shell command: (.*)$", block, flags=re.M)
        if rule and shell and shell.group(1) != "None":  # rule all: no command
            jobs.append((rule.group(1), shell.group(1)))
    return jobs, planned


@pytest.mark.workflow
def test_dry_run_shell_commands_keep_config_strings_quoted(evil_workdir: Path) -> None:
    result = run_snakemake(
        evil_workdir, "--configfile", "evil.yaml", "--dry-run", "--forceall", "--printshellcmds"
    )
    jobs, planned = _dry_run_jobs(result.stdout + result.stderr)
    assert {rule for rule, _ in jobs} == planned - {"all"} and len(planned) >= 16
    for rule, command in jobs:
        assert _only_the_log_redirect(command), f"{rule}: {command}"
        tokens = shlex.split(command)
        tainted = [t for t in tokens if "INJECTED" in t]
        assert tainted, f"{rule}: no configured path in {command}"
        # Each configured path arrives as one whole argument.
        assert all(t.startswith((EVIL_RESULTS, EVIL_DEMO)) for t in tainted), f"{rule}: {tokens}"
    assert _markers_under(evil_workdir) == []


@pytest.mark.workflow
def test_data_stages_run_in_a_results_dir_named_like_a_shell_injection(evil_workdir: Path) -> None:
    results = evil_workdir / EVIL_RESULTS
    run_snakemake(
        evil_workdir,
        f"{EVIL_RESULTS}/folds/folds.csv",
        f"{EVIL_RESULTS}/preprocess/stats.json",
        "--configfile",
        "evil.yaml",
    )
    for relative in (
        "ingest/manifest.parquet",
        "dedup/items.parquet",
        "folds/folds.csv",
        "preprocess/stats.json",
    ):
        assert (results / relative).is_file(), relative
    assert (evil_workdir / EVIL_DEMO / "train.csv").is_file()
    assert (results / "logs" / "ingest_train.log").is_file()
    assert pd.read_csv(results / "folds" / "folds.csv")["fold"].nunique() == 2
    assert _markers_under(evil_workdir.parent) == []
    assert os.listdir(evil_workdir.parent) == ["workflow"]
