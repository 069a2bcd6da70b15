"""The workflow's JSON schema and the stage option dataclasses must agree key for key."""

from __future__ import annotations

import dataclasses

import jsonschema
import pytest
import yaml
from conftest import REPO_ROOT

from segflow.core.config_check import check_config, train_folds
from segflow.core.errors import SegflowError
from segflow.data.dedup import DedupOptions, NearDuplicateOptions
from segflow.data.demo_data import DemoDataOptions
from segflow.data.folds import FoldOptions
from segflow.data.ingest import IngestOptions
from segflow.data.preprocess import PreprocessOptions
from segflow.ensemble.stacking.stack import StackOptions
from segflow.model.budget import BudgetOptions
from segflow.model.inference.predict import PredictOptions
from segflow.model.resolution_plan import RESOLUTION_KEYS
from segflow.model.submit import SubmissionOptions
from segflow.model.training.train_options import TrainOptions

SCHEMA = yaml.safe_load((REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())

# Config section -> options dataclass(es), and the section keys that are workflow-only.
SECTIONS = {
    "data": (IngestOptions, set()),
    # dedup reads the first, make_folds the near-duplicate options.
    "dedup": ((DedupOptions, NearDuplicateOptions), set()),
    "preprocess": (PreprocessOptions, set()),
    # Which folds train is the workflow's (common.smk TRAIN_FOLDS), not the split's.
    "folds": (FoldOptions, {"train_folds"}),
    "demo": (DemoDataOptions, {"enabled", "out_dir"}),
    "predict": (PredictOptions, set()),
    "submission": (SubmissionOptions, set()),
    "budget": (BudgetOptions, set(RESOLUTION_KEYS)),  # the rest: ResolutionOptions
    # Which stack jobs run (stack.pixel_blender: false drops stack_pixel) is the workflow's.
    "stack": (StackOptions, {"enabled", "pixel_blender"}),
}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_schema_keys_and_defaults_match_the_options_dataclass(section: str) -> None:
    classes, workflow_only = SECTIONS[section]
    properties = SCHEMA["properties"][section]["properties"]
    fields = {
        field.name: field
        for options_cls in (classes if isinstance(classes, tuple) else (classes,))
        for field in dataclasses.fields(options_cls)
    }
    assert set(properties) - workflow_only == set(fields)
    for name, field in fields.items():
        schema_default = properties[name].get("default", None)
        if name == "train_images":  # required in the schema, no default
            assert "default" not in properties[name]
            continue
        assert schema_default == field.default, f"{section}.{name}"
        choices = field.metadata.get("choices")
        if choices is not None:
            assert list(properties[name]["enum"]) == list(choices), f"{section}.{name}"


def test_train_schema_properties_are_train_options_fields() -> None:
    """experiments.*.train lists options without `default:` (see the schema); each is a
    TrainOptions field whose default the schema accepts, with the same choices."""
    train = SCHEMA["properties"]["experiments"]["additionalProperties"]["properties"]["train"]
    fields = {field.name: field for field in dataclasses.fields(TrainOptions)}
    for name, schema in train["properties"].items():
        assert name in fields, name
        assert "default" not in schema, name
        jsonschema.validate(fields[name].default, schema)
        choices = fields[name].metadata.get("choices")
        if choices is not None:
            assert list(schema["enum"]) == list(choices), name
    for name in ("steps_per_epoch", "mixup_prob", "mixup_alpha", "cutmix_prob", "cutmix_alpha"):
        assert name in train["properties"], name


def test_every_schema_property_is_described() -> None:
    def walk(node: dict, path: str) -> None:
        for key, child in node.get("properties", {}).items():
            assert child.get("description"), f"{path}{key} has no description"
            walk(child, f"{path}{key}.")

    walk(SCHEMA, "")


def test_every_schema_property_uses_only_schema_keywords() -> None:
    """A description with an unquoted ", " in a YAML flow mapping silently becomes a key."""
    keywords = set(jsonschema.Draft7Validator.META_SCHEMA["properties"])

    def walk(node: dict, path: str) -> None:
        for key, child in node.get("properties", {}).items():
            unknown = set(child) - keywords
            assert not unknown, f"{path}{key}: not schema keywords: {sorted(unknown)}"
            walk(child, f"{path}{key}.")
            if isinstance(child.get("items"), dict):
                walk(child["items"], f"{path}{key}[].")

    walk(SCHEMA, "")


def test_demo_config_is_valid_and_unknown_keys_are_rejected() -> None:
    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    jsonschema.validate(config, SCHEMA)
    config["preprocess"]["clahe_clp"] = 3.0
    with pytest.raises(jsonschema.ValidationError, match="clahe_clp"):
        jsonschema.validate(config, SCHEMA)


def test_example_configs_are_valid() -> None:
    for path in sorted((REPO_ROOT / "config" / "examples").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


def test_train_folds_default_is_every_fold_and_a_list_is_sorted() -> None:
    assert train_folds({"n_folds": 3}) == [0, 1, 2]
    assert train_folds({"n_folds": 5, "train_folds": None}) == [0, 1, 2, 3, 4]
    assert train_folds({"n_folds": 5, "train_folds": [3, 0]}) == [0, 3]
    assert SCHEMA["properties"]["folds"]["properties"]["train_folds"]["default"] is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            [3],
            "invalid config: folds.train_folds[0]: fold 3 does not exist (folds.n_folds is 3: "
            "folds 0 to 2)",
        ),
        (
            [0, -1],
            "invalid config: folds.train_folds[1]: fold -1 does not exist (folds.n_folds "
            "is 3: folds 0 to 2)",
        ),
        ([1, 0, 1], "invalid config: folds.train_folds[2]: fold 1 is listed twice"),
        (
            [],
            "invalid config: folds.train_folds is empty: list at least one fold (e.g. [0]), or "
            "null for every fold",
        ),
        ([True], "invalid config: folds.train_folds[0]: True is not a fold index (an integer)"),
        (0, "invalid config: folds.train_folds must be a list of fold indices or null, got 0"),
    ],
    ids=["out-of-range", "negative", "duplicate", "empty", "bool", "not-a-list"],
)
def test_bad_train_folds_stop_with_one_line_naming_the_key(value: object, message: str) -> None:
    with pytest.raises(SegflowError) as info:
        train_folds({"n_folds": 3, "train_folds": value})
    assert str(info.value) == message


def test_schema_check_names_train_folds_for_a_non_integer_entry(tmp_path) -> None:
    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    schema = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
    config["folds"]["train_folds"] = [0, 1]
    check_config(config, schema)
    config["folds"]["train_folds"] = [0, "1"]
    with pytest.raises(SegflowError, match=r"^invalid config: folds\.train_folds\[1\]: '1' is not"):
        check_config(config, schema)
