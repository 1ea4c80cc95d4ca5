"""The store's records file (repair/records.py): several processes write it at once and lose
no entry; an unreadable one is moved aside for the operator, never reset silently."""

import json
import logging
import os
import subprocess
import sys

from repair.records import StoreRecords
from tests.conftest import ROOT


def test_two_processes_recording_at_once_lose_no_entry(tmp_path):
    script = ("import sys\nfrom repair.records import StoreRecords\n"
              "r = StoreRecords(sys.argv[1])\n"
              "for i in range(60):\n    r.record_table('%s-%d' % (sys.argv[2], i), '%064x' % i)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), who], cwd=ROOT)
             for who in ("a", "b", "c")]
    for p in procs:
        assert p.wait(timeout=120) == 0
    data = json.load(open(tmp_path / ".llmnode" / "verified.json"))
    assert len(data["tables"]) == 180
    assert not [f for f in os.listdir(tmp_path / ".llmnode") if ".tmp-" in f]


def test_an_unreadable_records_file_is_moved_aside_and_logged(tmp_path, caplog):
    (tmp_path / ".llmnode").mkdir()
    (tmp_path / ".llmnode" / "verified.json").write_text('{"blobs": {"trunc')
    records = StoreRecords(str(tmp_path))
    with caplog.at_level(logging.ERROR):
        assert records.manifest_digest("x") is None
    aside = [f for f in os.listdir(tmp_path / ".llmnode") if ".unreadable-" in f]
    assert len(aside) == 1
    assert (tmp_path / ".llmnode" / aside[0]).read_text() == '{"blobs": {"trunc'
    assert "unreadable" in caplog.text and aside[0] in caplog.text
