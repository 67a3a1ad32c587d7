"""Model references (orchd/core/refs.py): every documented form parses, each malformed one is
refused with the form it should have had."""

from __future__ import annotations

import pytest

from orchd.core.errors import Code, OrchdError
from orchd.core.refs import ModelRef, parse, parse_ref, registry_of, unreachable

H = "a" * 64


def refused(ref: str) -> OrchdError:
    with pytest.raises(OrchdError) as ei:
        parse(ref)
    assert ei.value.code is Code.INVALID_PARAMS
    return ei.value


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("hf:org/repo", ModelRef("hf:org/repo", "hf", "org", "repo")),
        (
            "hf:Qwen/Qwen2.5-0.5B-Instruct",
            ModelRef("hf:Qwen/Qwen2.5-0.5B-Instruct", "hf", "Qwen", "Qwen2.5-0.5B-Instruct"),
        ),
        (
            "hf:org/repo/path/to/file.gguf",
            ModelRef("hf:org/repo/path/to/file.gguf", "hf", "org", "repo", "path/to/file.gguf"),
        ),
        ("hf:org/repo@main", ModelRef("hf:org/repo@main", "hf", "org", "repo", tag="main")),
        (
            "hf:org/repo/m.gguf@v1",
            ModelRef("hf:org/repo/m.gguf@v1", "hf", "org", "repo", "m.gguf", "v1"),
        ),
        ("file:/models/tiny.gguf", ModelRef("file:/models/tiny.gguf", "file", path="/models/tiny.gguf")),
        ("/models/tiny.gguf", ModelRef("/models/tiny.gguf", "file", path="/models/tiny.gguf")),
        ("models/tiny.gguf", ModelRef("models/tiny.gguf", "relative", path="models/tiny.gguf")),
        ("tiny.gguf", ModelRef("tiny.gguf", "relative", path="tiny.gguf")),
        (
            "https://host.example/path/model.bin",
            ModelRef("https://host.example/path/model.bin", "https", "host.example", path="/path/model.bin"),
        ),
        ("https://host:8443/m", ModelRef("https://host:8443/m", "https", "host:8443", path="/m")),
        (
            "s3://my-bucket/key/model.safetensors",
            ModelRef("s3://my-bucket/key/model.safetensors", "s3", "my-bucket", path="key/model.safetensors"),
        ),
        (
            "oci://registry.io/repo/name:tag",
            ModelRef("oci://registry.io/repo/name:tag", "oci", "registry.io", "repo/name", tag="tag"),
        ),
        ("oci://localhost:5000/repo:v1.2", ModelRef("oci://localhost:5000/repo:v1.2", "oci", "localhost:5000", "repo", tag="v1.2")),
        ("oci://reg.io/repo", ModelRef("oci://reg.io/repo", "oci", "reg.io", "repo")),
        (f"oci://reg.io/repo@sha256:{H}", ModelRef(f"oci://reg.io/repo@sha256:{H}", "oci", "reg.io", "repo", tag=f"sha256:{H}")),
        ("mock:tiny-2.b", ModelRef("mock:tiny-2.b", "mock", name="tiny-2.b")),
        ("random:tiny", ModelRef("random:tiny", "random", name="tiny")),
    ],
)  # fmt: skip
def test_every_documented_form_parses(ref: str, want: ModelRef) -> None:
    got = parse(ref)
    assert got == want
    assert parse_ref(ref) == (want.scheme, got.rest)
    assert got.remote is (want.scheme in ("hf", "https", "s3", "oci"))


def test_rest_is_what_follows_the_scheme() -> None:
    assert parse_ref("hf:org/name@v1") == ("hf", "org/name@v1")
    assert parse_ref("s3://b-1/k") == ("s3", "//b-1/k")
    assert parse_ref("a/b") == ("relative", "a/b")


@pytest.mark.parametrize(
    "ref", ["file:models/tiny.gguf", "file:./tiny", "file:", "file:/a\0b", "file:/a/../etc"]
)
def test_file_needs_an_absolute_path(ref: str) -> None:
    assert "absolute path" in refused(ref).message


@pytest.mark.parametrize("ref", ["../up.gguf", "a/../../b", "a\0b", "/x/../y", ""])
def test_paths_that_climb_or_hold_nul_are_refused(ref: str) -> None:
    refused(ref)


def test_too_long_is_refused() -> None:
    assert "2048" in refused("a" * 2049).message


def test_plain_http_names_the_allowed_form() -> None:
    e = refused("http://host/model.bin")
    assert "http" in e.message and "https://" in e.message


def test_unknown_scheme_lists_known_ones() -> None:
    e = refused("ftp://host/model")
    assert "unknown scheme 'ftp'" in e.message
    for s in ("hf", "file", "https", "s3", "oci"):
        assert s in e.message


HF = "hf:<org>/<name>[/<path>][@<revision>]"
OCI = "oci://<registry>/<repo>[:<tag>|@sha256:<hex>]"


@pytest.mark.parametrize(
    ("ref", "form"),
    [
        ("hf:name", HF),
        ("hf:/name", HF),
        ("hf:org/", HF),
        ("hf:org/name@", HF),
        ("hf:org/na me", HF),
        ("hf:org/repo//x", HF),
        ("https://host", "https://<host>/<path>"),
        ("https:/host/path", "https://<host>/<path>"),
        ("https:///path", "https://<host>/<path>"),
        ("s3://bucket", "s3://<bucket>/<key>"),
        ("s3://b/key", "s3://<bucket>/<key>"),
        ("s3://Bucket/key", "s3://<bucket>/<key>"),
        ("s3://bucket/", "s3://<bucket>/<key>"),
        ("oci://reg.io", OCI),
        ("oci://reg.io/repo@sha256:abc", OCI),
        ("oci://reg.io/repo@sha512:" + H, OCI),
        ("oci:reg.io/repo", OCI),
        ("mock:", "mock:<name>"),
        ("mock:a/b", "mock:<name>"),
        ("random:", "random:<name>"),
        ("random:../x", "random:<name>"),
    ],
)
def test_malformed_says_the_expected_form(ref: str, form: str) -> None:
    e = refused(ref)
    assert "malformed" in e.message and form in e.message and repr(ref) in e.message


def test_registry_of_names_where_a_remote_ref_comes_from() -> None:
    assert registry_of(parse("hf:org/repo")) == "huggingface.co"
    assert registry_of(parse("oci://reg.io:5000/r:t")) == "reg.io:5000"
    assert registry_of(parse("s3://bkt/k")) == "bkt"
    assert registry_of(parse("https://h.example/m")) == "h.example"
    assert registry_of(parse("file:/m")) == "" and registry_of(parse("m.gguf")) == ""


def test_unreachable_is_typed_and_says_what_to_do() -> None:
    e = unreachable("hf:org/repo", "no route to huggingface.co")
    assert e.code is Code.POOL_UNAVAILABLE and e.retriable
    assert "hf:org/repo" in e.message and "no route" in e.message
    assert "model_roots" in e.message
