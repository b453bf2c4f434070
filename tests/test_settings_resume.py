"""Dead settings removed (sampling.n, sampling.max_step_tokens) and the generate signature built from the
settings `sphere generate` reads (sphere.rundir.fingerprints.GENERATE_SAMPLING): a run directory recorded
before still resumes (sphere.rundir.resume.REMOVED_KEYS, the symmetric of ADDED_KEYS), and a removed key that
a signature carries again is compared as usual."""

from __future__ import annotations

import json

import pytest


def _generate_cfg():
    from hydra import compose, initialize_config_dir

    from sphere.cli import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("generate", overrides=["stages.stage3=false"])


def test_a_generate_record_with_the_removed_sampling_keys_still_resumes(tmp_path):
    from sphere.rundir.fingerprints import generate_signature
    from sphere.rundir.resume import SignatureMismatch, check_or_record, flatten, forget_checks

    new = generate_signature(_generate_cfg())
    assert set(new["sampling"]) == {"max_solution_tokens"}
    # the record an older sphere wrote: the whole sampling node as `sphere generate` composed it then (the
    # composed snapshot recorded it until it was rewritten without the dead keys)
    old_sampling = {"max_solution_tokens": 1024, "max_step_tokens": 256, "n": 4, "seed": 0,
                    "temperature": 0.8, "top_p": 1.0}
    old = {**new, "sampling": {**old_sampling, "seed": 0}}
    (tmp_path / "pairs.jsonl").write_text("{}\n")  # an output: a difference would be refused
    (tmp_path / "signature.json").write_text(json.dumps({"generate": {"signature": flatten(old)}}))
    forget_checks()
    assert check_or_record(tmp_path, "generate", new) == "match"

    # a removed key that a signature has again is compared as usual
    (tmp_path / "signature.json").write_text(json.dumps({"generate": {"signature": flatten(old)}}))
    forget_checks()
    back = {**new, "sampling": {**new["sampling"], "n": 8}}
    with pytest.raises(SignatureMismatch, match=r"sampling\.n: 4 -> 8"):
        check_or_record(tmp_path, "generate", back)


def test_removed_keys_are_not_composed_for_generate_or_run():
    from test_composed_snapshot import composed

    from sphere.rundir.resume import REMOVED_KEYS

    for key, args in ((("generate",), []), (("run",), [])):
        cfg = composed(key, args)
        assert not {"sampling.n", "sampling.max_step_tokens"} & set(cfg)
    assert {"sampling.n", "sampling.max_step_tokens"} <= set(REMOVED_KEYS)


def test_hf_expected_size_is_declared():
    from sphere.schema import DataSettings, doc

    assert DataSettings().hf_expected_size is None and "dry run" in doc("data.hf_expected_size")
