"""One definition of accounted parameters: what GetTask shows for a path is what evolution scored it on."""

from __future__ import annotations

import dataclasses

from conftest import register_digits


def test_get_task_reports_the_accounted_params_evolution_scores_with(make_app):
    app = make_app()
    register_digits(app, "a")
    register_digits(app, "b", seed=1)
    a, b = app.store.get_path("a"), app.store.get_path("b")
    params = {m: app.store.module_record(m).params for m in {*a.modules, *b.modules}}
    shared = set(a.modules) & set(b.modules)
    # both grew from the root's trunk, each with its own head: the trunk is shared, the heads are not
    assert shared == set(a.modules[:-1]) and a.modules[-1] != b.modules[-1]

    for task, rec in (("a", a), ("b", b)):
        expected = sum(params[m] / (2 if m in shared else 1) for m in rec.modules)
        assert app.core.path_view(rec)["accounted_params"] == round(expected)
        assert app.core.path_view(rec)["accounted_params"] == round(app.evolution.evolver.accounted(task, rec.modules))
        assert app.core.task_view(task)["path"]["accounted_params"] == round(expected)

    # a version of `a` that is not current and reuses `b`'s head (as a cross-task candidate may): it pays
    # half of that head, as its score charged it, not all of it as if `a` were not among the users
    kept = dataclasses.replace(a, version=a.version + 100, status="retired", modules=list(b.modules))
    expected = sum(params[m] / 2 for m in b.modules)
    assert app.core.path_view(kept)["accounted_params"] == round(expected)
    assert app.core.path_view(kept)["accounted_params"] == round(app.evolution.evolver.accounted("a", b.modules))
