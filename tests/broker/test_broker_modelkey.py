"""Model keys: parsed into the tuple routing matches; malformed ones are a clear 400."""

from __future__ import annotations

import pytest
from broker_fakes import GPT2_KEY

from broker.modelkey import parse_model_key
from edif.errors import BadRequest

TM = "nnsight.modeling.transformers.TransformersModel"


def test_parses_the_key_nnsight_sends() -> None:
    key = parse_model_key(GPT2_KEY)
    assert key.cls_path == TM
    assert key.repo_id == "openai-community/gpt2"
    assert key.revision is None
    assert key.task == "text-generation"
    assert key.trust_remote_code is False
    assert not key.raw_suffix


def test_spelling_differences_name_the_same_deployment() -> None:
    compact = TM + ':{"task":"text-generation","revision":"main","repo_id":"openai-community/gpt2"}'
    assert parse_model_key(compact).matches(parse_model_key(GPT2_KEY))


def test_fields_that_differ_do_not_match() -> None:
    base = parse_model_key(GPT2_KEY)
    for suffix in (
        '{"repo_id": "openai-community/gpt2", "revision": "v2", "task": "text-generation"}',
        '{"repo_id": "openai-community/gpt2", "revision": null, "task": "fill-mask"}',
        '{"repo_id": "openai-community/gpt2", "revision": null, "trust_remote_code": true, '
        '"task": "text-generation"}',
    ):
        assert not parse_model_key(f"{TM}:{suffix}").matches(base)
    other_class = GPT2_KEY.replace(TM, "nnsight.modeling.diffusion.DiffusionModel")
    assert not parse_model_key(other_class).matches(base)


def test_trust_remote_code_is_kept() -> None:
    key = parse_model_key(TM + ':{"repo_id": "x/y", "revision": null, "trust_remote_code": true}')
    assert key.trust_remote_code is True
    assert "trust_remote_code" in key.describe()


def test_vllm_raw_suffix() -> None:
    key = parse_model_key("nnsight.modeling.vllm.vllm.VLLM:meta-llama/Llama-3.1-8B")
    assert key.raw_suffix
    assert key.repo_id == "meta-llama/Llama-3.1-8B"
    assert key.match_tuple[2] == "main"


def test_only_the_first_colon_splits() -> None:
    key = parse_model_key(TM + ':{"repo_id": "org/name:weird", "revision": null}')
    assert key.repo_id == "org/name:weird"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "non-empty string"),
        (42, "non-empty string"),
        ("openai-community/gpt2", "'<class path>:<model>'"),
        (TM + ":", "'<class path>:<model>'"),
        ("not a path:{}", "dotted import path"),
        ("os:{}", "dotted import path"),
        (TM + ":{not json", "not valid JSON"),
        (TM + ":[1]", "neither JSON nor a repo id"),
        (TM + ':{"revision": null}', "repo_id"),
        (TM + ':{"repo_id": ""}', "repo_id"),
        (TM + ':{"repo_id": "a/b", "revision": 3}', "revision must be a string"),
        (TM + ':{"repo_id": "a/b", "trust_remote_code": "yes"}', "true or false"),
        (TM + ':{"repo_id": "a/b", "dtype": "float16"}', "unsupported fields: dtype"),
        (TM + ":a b", "neither JSON nor a repo id"),
        (TM + ":" + "x" * 5000, "longer than"),
    ],
)
def test_malformed_keys_are_bad_requests(raw: object, fragment: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_model_key(raw)
    assert caught.value.http_status == 400
    assert fragment in caught.value.message
