from datagen.build.workdir import ShardWork, remove_leftovers
from datagen.core.files import temporary_path


def test_removing_a_shard_folder_leaves_nothing_and_can_be_repeated(tmp_path):
    work = ShardWork(tmp_path, "shard-00000")
    work.write_manifest([])
    (work.root / "control").mkdir()
    (work.root / "control" / "s1.first.png").write_bytes(b"png")
    assert work.exists()
    work.remove()
    assert not work.exists() and list(tmp_path.iterdir()) == []
    work.remove()  # a retried write removes again: nothing to do, no error


def test_leftovers_of_killed_writers_and_removals_are_swept_and_nothing_else(tmp_path):
    kept = ShardWork(tmp_path, "shard-00001")
    kept.write_manifest([])
    torn_file = temporary_path(kept.root / "manifest.json")
    torn_file.write_bytes(b"half")
    renamed_away = temporary_path(tmp_path / "shard-00000")  # a removal killed mid-delete
    (renamed_away / "control").mkdir(parents=True)
    (renamed_away / "control" / "s1.first.png").write_bytes(b"png")

    removed = remove_leftovers(tmp_path)

    assert set(removed) == {torn_file, renamed_away}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00001"]
    assert [p.name for p in kept.root.iterdir()] == ["manifest.json"]
    assert remove_leftovers(tmp_path / "missing") == []
