"""The steps' contracts: the table in `pipelines.steps`' docstring is what the functions
declare, and every step function says what it takes and returns."""

from __future__ import annotations

import inspect
import re

import pytest

import pipelines.steps as steps

TABLE = re.compile(r"^\s+(\w+)\(([^)]*)\)\s+->\s+([\w\[\]]+)", re.M)


def _rows() -> list[tuple[str, str, str]]:
    return TABLE.findall(steps.__doc__)


def test_the_docstring_table_names_every_step_in_order():
    assert [name for name, _, _ in _rows()] == [
        "plan_search", "prepare_data", "tune_trials", "evaluate_best", "register_best"]


@pytest.mark.parametrize("name,args,returns", _rows())
def test_each_row_is_the_functions_own_signature(name, args, returns):
    sig = inspect.signature(getattr(steps, name))
    params = [p for p in sig.parameters.values() if p.default is inspect.Parameter.empty
              and p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in params] == [a.strip() for a in args.split(",")]
    assert sig.return_annotation == returns


def test_the_data_steps_hand_on_typed_values():
    """ingest -> validate -> split: each output the next one's input, by annotation."""
    assert inspect.signature(steps.ingest).return_annotation == "Ingested"
    assert inspect.signature(steps.validate).parameters["ingested"].annotation == "Ingested"
    assert inspect.signature(steps.validate).return_annotation == "Validated"
    assert inspect.signature(steps.split).parameters["validated"].annotation == "Validated"
    assert inspect.signature(steps.split).return_annotation == "SplitManifest"
    # the decoded stores are validate's output and travel beside the manifest, not on it
    assert "stores" in steps.Validated.__dataclass_fields__
    assert "stores" in steps.PreparedData.__dataclass_fields__
    from components.data.split import SplitManifest
    assert not {"decoded", "stores"} & set(SplitManifest.__dataclass_fields__)


@pytest.mark.parametrize("module", ["common", "data", "tune", "evaluate", "register",
                                    "extend"])
def test_every_public_step_function_declares_its_return(module):
    mod = getattr(steps, module)
    missing = [name for name, fn in inspect.getmembers(mod, inspect.isfunction)
               if fn.__module__ == mod.__name__ and not name.startswith("_")
               and inspect.signature(fn).return_annotation is inspect.Signature.empty]
    assert missing == [], f"pipelines/steps/{module}.py: no return annotation on {missing}"
