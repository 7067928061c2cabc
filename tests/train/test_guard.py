"""The guard: roll back a collapsed run, stop a hopeless or flat one, resume its judgement."""

from __future__ import annotations

import json

from loomlens.train.guard import Evaluation, Guard


def ev(step, score, val_loss=3.0, train_loss=None, empty=None):
    return Evaluation(step=step, score=score, val_loss=val_loss, train_loss=train_loss, empty_on_defects=empty)


def test_empty_answers_after_learning_roll_back_then_stop() -> None:
    g = Guard(max_rollbacks=1)
    assert g.judge(ev(200, 0.0, empty=1.0)).action == "continue"  # not learned yet: not a collapse
    assert g.judge(ev(400, 0.3, empty=0.2)).action == "continue"
    v = g.judge(ev(600, 0.0, empty=0.95))
    assert v.action == "rollback" and "95%" in v.reason
    assert g.best.step == 400 and [h.step for h in g.history] == [200, 400]
    assert g.judge(ev(800, 0.25, empty=0.3)).action == "continue"
    v = g.judge(ev(1000, 0.0, empty=1.0))
    assert v.action == "collapsed" and "after 1 rollback" in v.reason


def test_rising_val_loss_while_train_loss_falls_is_a_collapse() -> None:
    g = Guard(rising=3)
    for step, score, val, train in [(1, 0.4, 2.9, 3.0), (2, 0.35, 3.1, 2.5), (3, 0.3, 3.4, 2.2)]:
        assert g.judge(ev(step, score, val, train)).action == "continue"
    v = g.judge(ev(4, 0.2, 3.9, 2.0))
    assert v.action == "rollback" and "val loss rose 3 evaluations" in v.reason


def test_rising_val_loss_with_rising_train_loss_is_not_over_fitting() -> None:
    g = Guard(rising=2)
    for step, val, train in [(1, 2.9, 2.0), (2, 3.1, 2.5), (3, 3.4, 2.9)]:
        assert g.judge(ev(step, 0.5 - step / 10, val, train)).action == "continue"


def test_plateau_stops_after_patience() -> None:
    g = Guard(patience=2)
    assert g.judge(ev(1, 0.3)).action == "continue"
    assert g.judge(ev(2, 0.3)).action == "continue"  # equal is no better
    v = g.judge(ev(3, 0.29))
    assert v.action == "plateau" and "best at step 1" in v.reason
    assert Guard(patience=0).judge(ev(1, 0.1)).action == "continue"


def test_state_survives_json_and_judges_the_same() -> None:
    g = Guard(max_rollbacks=1)
    g.judge(ev(1, 0.4))
    g.judge(ev(2, 0.0, empty=1.0))  # rollback
    again = Guard(max_rollbacks=1)
    again.restore(json.loads(json.dumps(g.state())))
    assert again.rollbacks == 1 and again.history == g.history
    assert again.judge(ev(3, 0.0, empty=1.0)).action == g.judge(ev(3, 0.0, empty=1.0)).action == "collapsed"


def test_a_loss_over_ten_times_the_first_ones_has_exploded() -> None:
    g = Guard()
    assert [g.exploded(x, step=i) for i, x in enumerate((7.5, 9.0, 60.0), 1)] == ["", "", ""]  # 60 < 10 x 9
    assert g.early == [7.5, 9.0, 60.0] and g.sound_step == 3
    why = g.exploded(900.0, step=4)
    assert why.startswith("train loss 900") and "over 10x" in why and "at most 60" in why
    assert g.early == [7.5, 9.0, 60.0] and g.sound_step == 3  # an explosion neither sets the scale nor vouches
    for x in range(20):
        g.exploded(1.0 + x, step=5 + x)
    assert len(g.early) == 10 and g.sound_step == 24  # the scale: only the run's first ones
    assert Guard(explode=0).exploded(1e9, step=1) == ""
    near_zero = Guard()  # a run continued from a model already fine-tuned on its data
    near_zero.exploded(0.05, step=1)
    assert near_zero.exploded(0.9, step=2) == "" and near_zero.exploded(11.0, step=3)  # only past ln V


def test_the_loss_scale_survives_a_resume() -> None:
    g = Guard()
    g.exploded(5.0, step=1)
    again = Guard()
    again.restore(json.loads(json.dumps(g.state())))
    assert again.early == [5.0] and again.sound_step == 1
    assert again.exploded(51.0, step=2) and not again.exploded(49.0, step=3)
    older = Guard()
    older.restore({"history": [], "rollbacks": 0})  # a checkpoint from before the scale was saved
    assert older.early == [] and older.exploded(3.0, step=7) == "" and older.early == [3.0]
