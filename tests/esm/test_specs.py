"""Task specs: one expander for lists of specs and one resolver for a spec."""

from __future__ import annotations

import pytest

from stepstone.esm.catalog import builtin_ids, is_available, pool_ids
from stepstone.esm.data import DataError
from stepstone.esm.specs import expand_specs, load_task


def test_expand_specs_forms(small_task):
    assert expand_specs("sms_spam,trec6") == ["builtin:sms_spam", "builtin:trec6"]
    assert expand_specs(["data.csv"]) == ["data.csv"]
    assert expand_specs([" trec6 ,, builtin:trec6", "a.csv", "a.csv"]) == [
        "builtin:trec6", "a.csv"]
    assert expand_specs(small_task) == [small_task]
    everything = expand_specs("all")
    assert everything == expand_specs("builtin:all") == [
        f"builtin:{i}" for i in pool_ids() if is_available(i)]
    assert set(pool_ids()) < set(builtin_ids())  # `all` is the benchmark pool


def test_load_task_resolves_each_kind(tmp_path, small_task):
    assert load_task(small_task) is small_task
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)))
    assert load_task(str(path)).task_id == "t"
    with pytest.raises(DataError, match="Unknown built-in task .no_such_task."):
        load_task("builtin:no_such_task")
