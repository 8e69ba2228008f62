"""Model references (sdsecure/refs.py): every accepted form, and clear one-line errors for nonsense."""

from __future__ import annotations

import pytest

from sdsecure.errors import UserError
from sdsecure.refs import embedded_path, parse_ref

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_embedded_is_package_data():
    ref = parse_ref("embedded")
    assert ref.kind == "embedded" and ref.path == embedded_path() and (ref.path / "model_index.json").is_file()
    assert str(ref) == "embedded"


def test_local_folder_and_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(b"x")
    assert parse_ref(str(tmp_path / "m")).kind == "dir"
    f = parse_ref(str(tmp_path / "m" / "model.onnx"))
    assert f.kind == "file" and f.path.name == "model.onnx"


@pytest.mark.parametrize("text,revision,repo,rev", [
    ("org/name", None, "org/name", None),
    ("org/name@v1.0", None, "org/name", "v1.0"),
    (f"org/name@{SHA}", None, "org/name", SHA),
    ("org/name", "main", "org/name", "main"),
    ("org/name@main", "main", "org/name", "main"),            # same revision twice is fine
    ("Org-1/na_me.v2", "refs/pr/3", "Org-1/na_me.v2", "refs/pr/3"),
])
def test_hub_ids(text, revision, repo, rev):
    ref = parse_ref(text, revision)
    assert (ref.kind, ref.repo_id, ref.revision, ref.text) == ("hub", repo, rev, repo)


def test_local_path_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_ref("org/name").kind == "dir"


@pytest.mark.parametrize("text,revision,msg", [
    ("", None, "no model given"),
    ("   ", None, "no model given"),
    ("embedded", "main", "Hub models only"),
    ("org/name@", None, "empty revision"),
    ("org/name@v1", "v2", "two different revisions"),
    ("org/name@..", None, "invalid revision"),
    ("org/name@-rf", None, "invalid revision"),
    ("org/name", "a..b", "invalid revision"),
    ("org/name", "bad rev", "invalid revision"),
    ("https://huggingface.co/org/name", None, "org/name"),
    ("./no/such/folder", None, "no such file or folder"),
    ("a/b/c", None, "no such file or folder"),
    ("model.onnx", None, "no such file or folder"),
    ("org/../name", None, "no such file or folder"),
    ("org/na--me", None, "cannot understand|no such"),
    ("-org/name", None, "cannot understand|no such"),
    ("justaname", None, "cannot understand"),
])
def test_nonsense_is_a_one_line_user_error(text, revision, msg):
    with pytest.raises(UserError, match=msg) as exc:
        parse_ref(text, revision)
    assert "\n" not in str(exc.value)


def test_revision_with_a_local_path_is_refused(tmp_path):
    with pytest.raises(UserError, match="Hub models only"):
        parse_ref(str(tmp_path), "main")
