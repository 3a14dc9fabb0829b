"""The request options, declared once (deepminer.options): the schema, the one-line errors, the
published copy in docs/api.md, and the CLI using the same declaration."""
import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from deepminer.errors import InputError
from deepminer.options import DEFAULTS, OPTIONS_SCHEMA, ExplainOptions, mask_to_png

ROOT = Path(__file__).resolve().parents[1]


def test_docs_publish_the_schema_the_code_uses():
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S) if '"$schema"' in b]
    assert blocks == [OPTIONS_SCHEMA]


def test_defaults_and_a_full_set():
    assert ExplainOptions.parse(None) == ExplainOptions.parse(b"") == ExplainOptions.parse("{}") == ExplainOptions()
    assert ExplainOptions().top_units == DEFAULTS["top_units"] == 8 and ExplainOptions().unit_maps == "top"
    mask = np.zeros((20, 10), bool)
    mask[2:5, 3:7] = True
    raw = {"top_units": 3, "unit_maps": "all", "max_side": 512, "tissue_mask": True,
           "sketch": base64.b64encode(mask_to_png(mask)).decode()}
    opts = ExplainOptions.parse(json.dumps(raw).encode(), num_units=32)
    assert (opts.top_units, opts.unit_maps, opts.max_side, opts.tissue_mask) == (3, "all", 512, True)
    assert not ExplainOptions().tissue_mask and "tissue_mask" not in ExplainOptions().to_json()
    assert np.array_equal(opts.sketch_mask((20, 10)), mask)
    assert opts.sketch_mask((40, 20)).sum() == 4 * mask.sum()  # resized (nearest) to the image
    assert ExplainOptions.parse(opts.to_json()) == opts  # the client's JSON parses back to the same options
    assert ExplainOptions.parse({"max_side": None, "sketch": None}) == ExplainOptions()  # null = default


@pytest.mark.parametrize("raw, message", [
    ('{"top_units": 3', "options: malformed JSON"),
    ("[1, 2]", "options: expected a JSON object, got list"),
    (b"\xff\xfe", "options: not UTF-8"),
    ({"colour": "red"}, "options: unknown option(s) colour (known: top_units, unit_maps, sketch, max_side, methods, target, job, tissue_mask, ablate)"),
    ({"tissue_mask": "yes"}, "options.tissue_mask: 'yes' is not of type 'boolean'"),
    ({"top_units": 0}, "options.top_units: 0 is less than the minimum of 1"),
    ({"top_units": True}, "options.top_units: True is not of type 'integer'"),
    ({"top_units": 2.5}, "options.top_units: 2.5 is not of type 'integer'"),
    ({"top_units": 33}, "options.top_units: must be at most the model's 32 units, got 33"),
    ({"unit_maps": "some"}, "options.unit_maps: must be one of none/top/all, got 'some'"),
    ({"max_side": 10}, "options.max_side: 10 is less than the minimum of 64"),
    ({"max_side": 5000}, "options.max_side: 5000 is greater than the maximum of 4096"),
    ({"sketch": 5}, "options.sketch: 5 is not of type 'string', 'null'"),
    ({"job": "a b"}, "options.job: 'a b' does not match"),
    ({"sketch": "***"}, "options.sketch: not valid base64"),
    ({"sketch": base64.b64encode(b"GIF89a" + bytes(20)).decode()}, "options.sketch: not a PNG image"),
])
def test_every_bad_option_is_one_line_naming_it(raw, message):
    with pytest.raises(InputError) as err:
        ExplainOptions.parse(raw, num_units=32)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_job_id_is_an_explanations_option():
    opts = ExplainOptions.parse({"job": "abcDEF-123_x", "methods": ["gradcam"]})
    assert opts.job == "abcDEF-123_x" and opts.to_json()["job"] == "abcDEF-123_x"
    opts.check_endpoint(explain=True)
    with pytest.raises(InputError, match="options.job: only for POST /explanations"):
        ExplainOptions.parse({"job": "abcDEF-123_x"}).check_endpoint(explain=False)


def test_cli_flags_are_named_as_flags():
    with pytest.raises(InputError, match=r"^--max-side: 10 is less than the minimum of 64$"):
        ExplainOptions.build(max_side=10, flags=True)
    with pytest.raises(InputError, match=r"^--top-units: 0 is less"):
        ExplainOptions.build(top_units=0, flags=True)


def test_an_unreadable_png_sketch_is_one_line():
    png = mask_to_png(np.ones((4, 4), bool))
    opts = ExplainOptions.parse({"sketch": base64.b64encode(png[:30]).decode()})  # the signature, then garbage
    with pytest.raises(InputError, match=r"^options.sketch: unreadable PNG"):
        opts.sketch_mask((4, 4))
