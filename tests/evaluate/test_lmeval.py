"""lm-eval task resolution (builder/evaluate/lmeval.py) without a model: local files, registry names found
by their task file, and registry tasks pinned to a dataset revision."""
from unittest import mock

import pytest

from builder.errors import StageError
from builder.evaluate.lmeval import local_task, pinned_task, registry_task


def test_registry_names_are_found_by_their_task_file_without_the_full_index():
    name, folder, path = registry_task("arc_easy")
    assert name == "arc_easy" and path.parent == folder and "task: arc_easy" in path.read_text()
    assert registry_task("no_such_task_anywhere") is None


def test_a_pinned_registry_task_reads_its_dataset_at_that_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval.api.task
    from lm_eval.tasks import TaskManager

    assert pinned_task("arc_easy", tmp_path) is None  # no @revision: the registry's own settings
    name, folder = pinned_task("arc_easy@0123abcd", tmp_path)
    seen = {}

    def download(self, dataset_kwargs=None, **kwargs):
        seen.update(path=self.config.dataset_path, kwargs=dataset_kwargs)
        raise RuntimeError("offline: stop before any data is read")

    with mock.patch.object(lm_eval.api.task.ConfigurableTask, "download", download), pytest.raises(RuntimeError):
        TaskManager(include_path=[str(folder)], include_defaults=False).load([name])
    assert seen == {"path": "allenai/ai2_arc", "kwargs": {"revision": "0123abcd"}}


def test_local_task_files_need_a_task_name(tmp_path):
    (tmp_path / "t.yaml").write_text("task: mine\ndataset_path: json\n")
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    assert local_task("t.yaml", tmp_path) == ("mine", tmp_path)
    assert local_task("arc_easy", tmp_path) is None
    with pytest.raises(StageError, match="needs a `task:` name"):
        local_task("bad.yaml", tmp_path)
    with pytest.raises(StageError, match="cannot read missing.yaml"):
        local_task("missing.yaml", tmp_path)
