"""extract.cuda_graph and extract.bucket: the schema's values, their command-line spellings, one
clear config error for anything else, and the extract stage's flags."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dropinf.pipeline import options

REPO = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
EXTRACT = {"type": "object", "properties": {"extract": SCHEMA["properties"]["extract"]}}


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("true", True), ("false", False), ("off", False)])
def test_cuda_graph_from_the_command_line(text, value):
    config = {"extract": {"cuda_graph": text, "bucket": "64"}}
    options.apply_command_line(config, {"extract": {"cuda_graph": text, "bucket": "64"}}, SCHEMA)
    assert config["extract"]["cuda_graph"] == value and type(config["extract"]["cuda_graph"]) is type(value)
    assert config["extract"]["bucket"] == 64
    assert options.schema_error(config, EXTRACT) is None


@pytest.mark.parametrize("extract, message", [
    ({"cuda_graph": "yes"}, "config error at 'extract.cuda_graph': 'yes' is not allowed (auto, true or false)"),
    ({"cuda_graph": 1}, "config error at 'extract.cuda_graph': 1 is not allowed (auto, true or false)"),
    ({"bucket": -1}, "config error at 'extract.bucket': -1 is less than the minimum of 0"),
    ({"bucket": 8.5}, "config error at 'extract.bucket': 8.5 is not of type 'integer'"),
])
def test_bad_values_are_one_config_error(extract, message):
    assert options.schema_error({"extract": extract}, EXTRACT) == message


def test_defaults():
    config = {"extract": {}}
    options.fill_defaults(config, EXTRACT)
    assert config["extract"]["cuda_graph"] == "auto" and config["extract"]["bucket"] == 0


def test_the_extract_command_takes_both(extract_job):
    job = extract_job
    assert (job().cuda_graph, job().bucket) == ("auto", 0)
    assert (job("--cuda-graph", "false", "--bucket", "32").cuda_graph, job("--bucket", "32").bucket) == ("false", 32)
    with pytest.raises(SystemExit):
        job("--cuda-graph", "yes")
