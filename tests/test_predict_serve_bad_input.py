"""Bad input to ``peftkit predict``, ``serve``, ``compare`` and ``recipes|presets|prompts
show``: one line ``peftkit: error: ...`` naming what and where, before the base loads; over
HTTP a 422 naming the field, never a 500."""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_bad_input import assert_one_line_error, run_cli

from peftkit.errors import ConfigError


@pytest.fixture()
def no_base(monkeypatch):
    """Loading a base fails the test: every refusal here must come before it."""

    def load_base(*args, **kwargs):
        raise AssertionError("the base was loaded for bad input")

    monkeypatch.setattr("peftkit.models.base.load_base", load_base)


@pytest.fixture()
def predict(tmp_path, no_base):
    (tmp_path / "reg").mkdir()
    return ["predict", "--adapter", "x", "--registry", tmp_path / "reg"]


# --- predict: texts as arguments, in a file, on stdin --------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "\udcff\udcfe bad",
            "text argument 1: not valid UTF-8 text (a lone surrogate at character 0",
        ),
        ("", "text argument 1 is empty"),
        ("   ", "text argument 1 is empty"),
    ],
)
def test_predict_refuses_argument_texts_that_are_empty_or_not_utf8(predict, capsys, text, expected):
    code, out, err = run_cli([*predict, text], capsys)
    assert_one_line_error(code, out, err, expected)


def test_predict_names_the_bad_argument_among_good_ones(predict, capsys):
    code, out, err = run_cli([*predict, "good", "\ud800"], capsys)
    assert_one_line_error(code, out, err, "text argument 2: not valid UTF-8")


def test_predict_refuses_stdin_lines_that_are_not_utf8(predict, capsys, monkeypatch):
    # bytes that were not UTF-8 arrive as lone surrogates (surrogateescape)
    monkeypatch.setattr(sys, "stdin", io.StringIO("fine\n\udcff\udcfe bad\n"))
    code, out, err = run_cli(predict, capsys)
    assert_one_line_error(code, out, err, "standard input, line 2: not valid UTF-8 text")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"text": "good row"}\n{"text": "broken"\n', "line 2: not valid JSON"),
        ('{"text": "\\ud800"}\n', "line 1, 'text': not valid UTF-8"),
        ('{"text": "a", "text_pair": "\\udfff"}\n', "line 1, 'text_pair': not valid UTF-8"),
        ('\n\n{"text": "a"}\n{broken\n', "line 4: not valid JSON"),
    ],
)
def test_predict_refuses_a_broken_jsonl_row_naming_the_line(
    predict, capsys, tmp_path, content, expected
):
    path = tmp_path / "rows.jsonl"
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    code, out, err = run_cli([*predict, "--file", path], capsys)
    assert_one_line_error(code, out, err, f"--file {path}, {expected}")


def test_a_broken_row_is_refused_in_any_file_that_has_json_rows(predict, capsys, tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    code, out, err = run_cli([*predict, "--file", path], capsys)
    assert_one_line_error(code, out, err, f"--file {path}, line 2: not valid JSON")


def test_a_plain_text_file_may_hold_a_line_with_a_brace(predict, capsys, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("{braces} are fine in plain text\nsecond\n")
    code, out, err = run_cli([*predict, "--file", path], capsys)
    # the texts are taken: the error is the next step's (no adapter 'x' registered)
    assert code == 1 and "--file" not in err and "not valid JSON" not in err, err


def test_predict_file_that_is_not_a_regular_file(predict, capsys):
    code, out, err = run_cli([*predict, "--file", "/dev/null"], capsys)
    assert_one_line_error(code, out, err, "--file /dev/null: not a regular file")


# --- recipes | presets | prompts show -----------------------------------------------------


@pytest.mark.parametrize("kind", ["recipes", "presets", "prompts"])
def test_show_refuses_a_file_that_is_not_utf8(kind, tmp_path, capsys):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"name: \xff\xfe r1\n")
    code, out, err = run_cli([kind, "show", path], capsys)
    assert_one_line_error(code, out, err, str(path), "not UTF-8 text (byte 6")
    assert out == ""


@pytest.mark.parametrize("kind", ["recipes", "presets", "prompts"])
def test_show_refuses_a_folder_or_a_device(kind, tmp_path, capsys):
    code, out, err = run_cli([kind, "show", tmp_path], capsys)
    assert_one_line_error(code, out, err, "is a folder, not a regular file")
    code, out, err = run_cli([kind, "show", "/dev/zero"], capsys)
    assert_one_line_error(code, out, err, "'/dev/zero' is a device")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("root:x:0:0:root:/root:/bin/bash\n", "a recipe must be a mapping"),
        ("- a\n- b\n", "a recipe must be a mapping of keys, got list"),
        ("name: r1\nbase: [minilm\n", "invalid YAML"),
        ("", "the recipe is empty"),
    ],
)
def test_recipes_show_refuses_a_file_that_is_not_a_recipe(tmp_path, capsys, content, expected):
    path = tmp_path / "not-a-recipe.yaml"
    path.write_text(content)
    code, out, err = run_cli(["recipes", "show", path], capsys)
    assert_one_line_error(code, out, err, str(path), expected)
    assert out == ""


def test_show_still_prints_a_built_in_file(capsys):
    code, out, _ = run_cli(["recipes", "show", "quickstart"], capsys)
    assert code == 0 and "base:" in out


# --- compare ------------------------------------------------------------------------------


def _run_folder(root: Path, name: str, metrics) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


GOOD_METRICS = {"recipe": "q", "method": "lora", "accuracy": 0.5, "accuracy_ci95": [0.4, 0.6]}


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ([1, 2], "metrics must be a JSON object of names to values, got list"),
        ("high", "metrics must be a JSON object of names to values, got str"),
        ({**GOOD_METRICS, "accuracy": "high"}, "'accuracy' must be a number, got 'high'"),
        ({**GOOD_METRICS, "accuracy": True}, "'accuracy' must be a number"),
        ({**GOOD_METRICS, "accuracy_ci95": "x"}, "'accuracy_ci95' must be a [low, high] pair"),
        ({**GOOD_METRICS, "trainable": [1]}, "'trainable' must be a number"),
    ],
)
def test_compare_refuses_metrics_that_are_not_an_object_of_numbers(
    tmp_path, capsys, metrics, expected
):
    good = _run_folder(tmp_path, "good", GOOD_METRICS)
    bad = _run_folder(tmp_path, "bad", metrics)
    code, out, err = run_cli(["compare", good, bad], capsys)
    assert_one_line_error(code, out, err, f"{bad / 'metrics.json'}: {expected}")


def test_compare_still_prints_good_runs(tmp_path, capsys):
    a = _run_folder(tmp_path, "a", GOOD_METRICS)
    b = _run_folder(tmp_path, "b", {**GOOD_METRICS, "accuracy": 0.75, "macro_f1": None})
    code, out, err = run_cli(["compare", a, b], capsys)
    assert code == 0 and "0.75" in out, (out, err)


# --- serve: flags refused before the base loads -------------------------------------------


def _serve(capsys, *argv) -> tuple[int, str]:
    from peftkit.serving.serve import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = main(parser.parse_args([str(a) for a in argv]))
    return code, capsys.readouterr().err.strip()


@pytest.fixture()
def serve_args(tmp_path, no_base):
    from peftkit.registry.store import Registry

    Registry(tmp_path / "reg")
    return ["--registry", tmp_path / "reg", "--base", "some/base"]


@pytest.mark.parametrize(
    ("adapters", "entry"), [(",", 1), ("", 1), ("a,", 2), ("a,,b", 2), (" , a", 1)]
)
def test_serve_refuses_empty_adapter_refs(serve_args, capsys, adapters, entry):
    code, err = _serve(capsys, *serve_args, "--adapters", adapters)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "(override '--adapters" in err
    assert f"adapters entry {entry} is empty" in err


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid"])
def test_serve_refuses_a_host_that_does_not_resolve_naming_host(serve_args, capsys, host):
    code, err = _serve(capsys, *serve_args, "--host", host)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"--host {host}: not an IP address or a host name" in err
    assert "--port" not in err


def test_serve_refuses_a_port_in_use_naming_port(serve_args, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _serve(capsys, *serve_args, "--port", port)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another with --port" in err


def test_serve_refuses_an_address_not_of_this_machine_naming_host(serve_args, capsys):
    from peftkit.serving.serve import check_listen

    try:
        check_listen("192.0.2.1", 8000)  # TEST-NET-1: no machine holds it
    except ConfigError as exc:
        assert "192.0.2.1:8000" in str(exc) and "--host" in str(exc)
    else:
        pytest.skip("this machine can bind 192.0.2.1")


# --- the HTTP request models: 422 naming the field, never a 500 -----------------------------


def _test_client(tmp_path, submit):
    """A TestClient on the app over a stand-in scheduler whose ``submit`` is given."""
    from fastapi.testclient import TestClient

    from peftkit.config.serve import ServeConfig
    from peftkit.registry.store import Registry
    from peftkit.serving.http import create_app

    scheduler = SimpleNamespace(
        observe=None, queued_rows=0, resident=(), running=True, submit=submit
    )
    registry = Registry(tmp_path / "reg")
    app = create_app(scheduler, registry, "fp", ServeConfig(registry=str(registry.root)))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture()
def client(tmp_path):
    async def submit(rows):
        raise AssertionError("a bad request reached the scheduler")

    with _test_client(tmp_path, submit) as c:
        yield c


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"adapter": "a", "inputs": ["\ud800"]}, "inputs.0: not valid UTF-8 text"),
        ({"adapter": "a", "inputs": ["ok", "x\udfff"]}, "inputs.1: not valid UTF-8 text"),
        ({"adapter": "a", "inputs": [{"text": "\ud800"}]}, "inputs.0.text: not valid UTF-8"),
        (
            {"adapter": "a", "inputs": [{"text": "ok", "text_pair": "\udc80"}]},
            "inputs.0.text_pair: not valid UTF-8",
        ),
        ({"adapter": "\ud800", "inputs": ["ok"]}, "adapter: not valid UTF-8"),
        ({"adapter": "a", "inputs": ["ok"], "return_probs": "yes"}, "return_probs"),
        ({"adapter": "a", "inputs": ["ok"], "return_probs": 1}, "return_probs"),
        ({"adapter": "a", "inputs": ["ok"], "return_probs": "true"}, "return_probs"),
    ],
)
def test_bad_fields_are_422_naming_the_field(client, body, field):
    # json.dumps writes lone surrogates as \\u escapes: what a client may send
    response = client.post(
        "/v1/classify",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert field in error and "internal error" not in error, error
    assert "function-after" not in error and "Value error" not in error, error


def _classify(client, body):
    return client.post(
        "/v1/classify",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


@pytest.mark.parametrize("top_k", ["3", True, 2.5, 2.0, 0, [3]])
def test_top_k_must_be_a_json_integer_of_at_least_one(client, top_k):
    response = _classify(client, {"adapter": "a", "inputs": ["ok"], "top_k": top_k})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error.startswith("top_k: ") and "internal error" not in error, error


@pytest.fixture()
def answering_client(tmp_path, monkeypatch):
    """A client whose scheduler answers every row and whose catalog pins any name to @1."""
    from peftkit.serving.catalog import Catalog

    monkeypatch.setattr(Catalog, "pin", lambda self, ref, where: SimpleNamespace(ref=f"{ref}@1"))
    probs = {"positive": 0.7, "neutral": 0.2, "negative": 0.1}

    async def submit(rows):
        return [
            SimpleNamespace(
                label="positive", score=0.7, ref=r.ref, adapter="a", abstained=False, probs=probs
            )
            for r in rows
        ]

    with _test_client(tmp_path, submit) as c:
        yield c


@pytest.mark.parametrize(("top_k", "kept"), [(3, 3), (1, 1), (None, 3)])
def test_an_integer_top_k_or_null_is_taken(answering_client, top_k, kept):
    body = {"adapter": "a", "inputs": ["ok"], "top_k": top_k, "return_probs": False}
    assert _classify(answering_client, body).status_code == 200
    response = _classify(answering_client, {**body, "return_probs": True})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["probs"]) == kept


def test_the_openapi_page_describes_the_strict_request(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    request = schema["ClassifyRequest"]["properties"]
    assert {"type": "integer", "minimum": 1} in request["top_k"]["anyOf"]
    assert request["return_probs"]["type"] == "boolean"
    assert {"InputRow", "RowResult", "ClassifyResponse"} <= set(schema)
