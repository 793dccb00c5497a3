"""Label Studio on PostgreSQL for teams (issue 36.5): `labelstudio.database: postgresql` starts a local cluster of
Debian's PostgreSQL beside the managed server; annotators' clicks go through it to our backend and back, the
annotations are pulled, and a restart finds them; `down` stops both. (The people path runs on it with
SA_ENGINE_TEST_LS_DATABASE=postgresql.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.integrations.labelstudio import (LabelStudio, ServerSettings, TaskImage, brush_result, free_port,
                                             keypoint_context, start_server, stop_server)
from engine.integrations.labelstudio import postgres
from engine.integrations.ml_backend import BASIC_USER
from storage.brush_rle import decode_mask
from tests.test_ml_backend import TOKEN, H, W, backend, images  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]


def test_label_studio_on_a_managed_postgresql_serves_clicks_and_keeps_annotations(tmp_path, images, backend):  # noqa: F811
    if postgres.pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (./dev.sh setup installs Debian's package as root)")
    data_dir = tmp_path / "ls"
    folder = Path(images.ref("im0.png").uri).parent
    settings = ServerSettings(data_dir=data_dir, port=free_port(), document_root=folder.parent, database="postgresql")
    try:
        info = start_server(settings, wait_s=300, log=lambda m: None)
        assert not (data_dir / "label_studio.sqlite3").exists()  # Label Studio's data is in PostgreSQL
        ls = LabelStudio(info.url, info.token)
        pid = ls.ensure_project("team on postgresql")
        ls.add_local_storage(pid, folder)
        im = TaskImage("im0.png", LabelStudio.local_file_url(folder / "im0.png", folder.parent), H, W)
        task_id = ls.import_tasks(pid, [im])["im0.png"]
        backend_id = ls.connect_ml_backend(pid, backend.url, BASIC_USER, TOKEN)
        answer = ls.predict_interactive(backend_id, task_id, keypoint_context([(40, 25)], [1], H, W))
        mask = decode_mask(answer["result"][0]["value"]["rle"], H, W)
        ls.create_annotation(task_id, [brush_result(mask, H, W)], lead_time_s=3.0)
        assert stop_server(data_dir)
        assert not postgres._running(postgres.pg_bin(), postgres.cluster_dir(data_dir) / "data")
        info = start_server(settings, wait_s=300, log=lambda m: None)  # a restart: the same database
        pulled = LabelStudio(info.url, info.token).pull(pid)
        assert [a.image_id for a in pulled.annotations] == ["im0.png"] and not pulled.problems
        assert (pulled.annotations[0].regions[0].mask == mask).all()  # the click's mask, kept across the restart
    finally:
        stop_server(data_dir)


def test_a_database_url_is_parsed_and_a_bad_one_named(monkeypatch):
    from engine.integrations.labelstudio import LabelStudioError

    db = postgres.from_url("postgresql://ls:s%40cret@db.example.org:6543/labels")
    assert (db.host, db.port, db.name, db.user, db.password) == ("db.example.org", 6543, "labels", "ls", "s@cret")
    assert db.env()["DJANGO_DB"] == "default" and db.env()["POSTGRE_PORT"] == "6543"
    monkeypatch.setenv("SA_ENGINE_LS_DB_PASSWORD", "from-env")
    assert postgres.from_url("postgresql://ls@db/labels").password == "from-env"
    with pytest.raises(LabelStudioError, match=r"\*\*\*"):  # the password never in the message
        postgres.from_url("mysql://ls:topsecret@db/labels")
