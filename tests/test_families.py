"""Every causal-LM family of the installed transformers with attn_implementation="fastmax".

For each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ``families.probe`` builds a tiny
model (float32, CPU, 2 layers, hidden size 32) and records forward, greedy cached generation
against recomputation, and whether the cache keeps a constant size (see tests/families.py for
what each status means). The results of the full sweep are kept in
tests/data/family_coverage.json, from which tools/family_table.py writes README.md's coverage
table.

    pytest tests/test_families.py                             # CI: the families marked "ci" below
    FASTMAX_FAMILY_SWEEP=full pytest tests/test_families.py   # every family; rewrites the JSON record

In both modes each family's status must be an accepted one (a refusal must be fastmax's own
error naming the family; a key/value cache only for the families fastmax_hf lists) and equal
to the recorded status, so the README cannot say what the code does not do.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import transformers

import families
from fastmax_hf.integration import KV_CACHE_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "data" / "family_coverage.json"
sys.path.insert(0, str(ROOT / "tools"))
import family_table  # noqa: E402

FULL = os.environ.get("FASTMAX_FAMILY_SWEEP") == "full"
# A representative, fast subset for CI (2 cores): each kind of family and each outcome once or more.
CI_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gpt2",            # the families of the fine-tuning script
    "gemma", "phi3", "olmo2", "gpt_neox", "qwen2_moe", "mixtral", "cohere2", "gemma3_text",  # issue 16's list
    "gemma2",        # refused as configured (soft-capping), works with the fix
    "deepseek_v3",   # latent attention: keys expanded after the cache update
    "jamba",         # mamba layers beside attention layers
    "falcon_h1",     # hybrid layers: a mamba state and a fastmax state in one layer
    "bert",          # an encoder family as a causal LM
    "falcon",        # refused: own attention dispatch
    "gpt_oss",       # refused: attention sinks
    "diffllama",     # key/value cache, by the table
    "mamba",         # no attention layers
)
ACCEPTED = ("state", "state (fix)", "refused", "growing cache", "no attention layers", "own constant-size cache",
            "not built")

RECORDED = json.loads(RECORD.read_text()) if RECORD.exists() or not FULL else {"transformers": None, "families": {}}
SELECTED = families.causal_lm_families() if FULL else list(CI_FAMILIES)
_RESULTS: dict[str, dict] = {}


def test_every_family_is_recorded():
    if FULL:
        return  # the full sweep writes the record (test_write_the_full_record)
    if RECORDED["transformers"] == transformers.__version__:
        assert set(RECORDED["families"]) == set(families.causal_lm_families())
    else:  # another transformers (CI installs the newest): the record describes the version it names
        assert set(CI_FAMILIES) <= set(families.causal_lm_families())


@pytest.mark.parametrize("family", SELECTED)
def test_family(family):
    result = families.probe(family)
    _RESULTS[family] = result.record()
    assert result.status in ACCEPTED, f"{family}: {result.status}: {result.detail}"
    if result.status == "refused":
        # fastmax's own FastmaxUnsupportedError for this family (families.probe checks its .family)
        assert "cannot serve model family" in result.detail and result.reason, result.detail
    if result.status == "growing cache":
        model_types = {family, families.tiny_config(family).get_text_config(decoder=True).model_type}
        assert model_types & set(KV_CACHE_FAMILIES), f"{family} keeps a key/value cache but is not listed"
    if not FULL and RECORDED["transformers"] == transformers.__version__:
        assert result.status == RECORDED["families"][family]["status"], result.detail


def test_write_the_full_record():
    """In the full sweep, after every family ran: write the record (the README table is made from it)."""
    if not FULL:
        assert RECORDED["families"], "the record is written by the full sweep: FASTMAX_FAMILY_SWEEP=full"
        return
    missing = sorted(set(families.causal_lm_families()) - set(_RESULTS))
    assert not missing, f"run the whole file for the full record; missing {missing}"
    rejected = {f: r["status"] for f, r in _RESULTS.items() if r["status"] not in ACCEPTED}
    assert not rejected, f"not recorded while families fail: {rejected}"
    record = {"transformers": transformers.__version__, "families": {f: _RESULTS[f] for f in families.causal_lm_families()}}
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")


def test_readme_table_is_generated_from_the_record():
    readme = (ROOT / "README.md").read_text()
    assert family_table.section(readme) == family_table.render(json.loads(RECORD.read_text())), (
        "README.md's family coverage table differs from tests/data/family_coverage.json: "
        "run `python tools/family_table.py --write`"
    )
