"""The HTTP edge's body parsing and error bodies (router/http): hostile bodies become
400s naming what is wrong, and an error body renders whatever text it quotes."""

from __future__ import annotations

import json

import pytest

from router.http.app import json_object
from router.http.errors import HttpError, error_response, model_not_found


@pytest.mark.parametrize("body", [
    b"{not json", b"\xff\xfe", b"[1, 2]", b'{"n": ' + b"7" * 5000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"prompt": "a\\udfff"}', b'{"stop": ["x", "\\ud800y"]}',
    b'{"messages": [{"role": "user", "content": "\\uDC00"}]}',
    b'{"logit_bias": {"\\ud800": 1}}',
])
def test_a_hostile_body_is_a_400(body: bytes) -> None:
    with pytest.raises(HttpError) as e:
        json_object(body)
    assert e.value.status == 400


def test_a_surrogate_pair_is_one_character_and_fine() -> None:
    assert json_object(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}


def test_a_lone_surrogate_names_its_field() -> None:
    with pytest.raises(HttpError) as e:
        json_object(b'{"model": "m", "stop": ["\\udbff"]}')
    assert e.value.param == "stop"


def test_an_error_quoting_a_lone_surrogate_still_renders() -> None:
    response = error_response(model_not_found("\ud800"))
    assert response.status_code == 404
    assert "\\ud800" in json.loads(response.body)["error"]["message"]
