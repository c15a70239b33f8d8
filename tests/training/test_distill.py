"""Distillation (--teacher, issue 26 lever c): the student's classification loss matches a frozen teacher's
class probabilities on the same augmented batch; the teacher is read without its prior correction."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import model_arch
from cxrkit.core.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint
from cxrkit.core.config import make_config
from cxrkit.core.model import build_model
from cxrkit.training.calibration import apply_prior_correction, remove_prior_correction
from cxrkit.training.losses import MultiTaskLoss, distill_loss
from tests.helpers import REPO


def test_distill_loss_is_zero_only_when_the_student_matches_the_teacher():
    t = torch.randn(6, 4)
    assert distill_loss(t.clone(), t, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(t + 1.0, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # a shift is the same softmax
    assert distill_loss(torch.randn(6, 4), t, 1.0).item() > 1e-3


def test_distill_loss_is_the_teachers_kl_to_the_student_scaled_by_t_squared():
    torch.manual_seed(1)
    s, t, temp = torch.randn(5, 4), torch.randn(5, 4), 2.0
    pt, log_pt, log_qs = (t / temp).softmax(1), (t / temp).log_softmax(1), (s / temp).log_softmax(1)
    expected = temp ** 2 * (pt * (log_pt - log_qs)).sum(1).mean()  # KL(teacher || student), not the reverse
    assert distill_loss(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-5)


def test_with_alpha_one_the_labels_do_not_enter_and_with_alpha_zero_only_they_do():
    torch.manual_seed(0)
    seg, m, hm = torch.randn(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.bool)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y1, y2 = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 1])
    pure = MultiTaskLoss(None, distill_alpha=1.0)
    assert pure(seg, s, m, hm, y1, t).cls.item() == pytest.approx(pure(seg, s, m, hm, y2, t).cls.item())
    labels_only = MultiTaskLoss(None, distill_alpha=0.0)
    plain = MultiTaskLoss(None)
    assert labels_only(seg, s, m, hm, y1, t).cls.item() == pytest.approx(plain(seg, s, m, hm, y1).cls.item())
    assert labels_only(seg, s, m, hm, y1, t).cls.item() != pytest.approx(pure(seg, s, m, hm, y1, t).cls.item())


def test_removing_the_prior_correction_undoes_it_on_every_member():
    torch.manual_seed(0)
    ens = build_model(make_config("tiny", num_classes=4, ensemble_size=2))
    before = [b.bias.detach().clone() for b in ens.class_outputs()]
    assert len(before) == 2
    ck = {"class_names": list("abcd")}
    apply_prior_correction(ens, ck, np.array([0] * 30 + [1] * 5 + [2] * 3 + [3] * 2))
    assert all(not torch.allclose(b.bias, o) for b, o in zip(ens.class_outputs(), before))
    remove_prior_correction(ens, ck)
    for b, o in zip(ens.class_outputs(), before):
        torch.testing.assert_close(b.bias, o)


def _args(data, out, size, *extra):
    return ["--data_dir", str(data), "--output_dir", str(out), "--arch", "tiny", "--img_size", str(size),
            "--num_epochs", "2", "--batch_size", "8", "--workers", "0", "--quiet", "--device", "cpu", *extra]


def test_a_distilled_run_records_its_teacher_and_resumes_bit_identically(mdt_subset, tiny_model, tmp_path):
    teach = ["--teacher", str(tiny_model.checkpoint), "--distill_temperature", "2"]
    a, b, plain = tmp_path / "a", tmp_path / "b", tmp_path / "plain"
    assert model_arch.main(_args(mdt_subset, a, 64, *teach)) == 0
    assert model_arch.main(_args(mdt_subset, b, 64, *teach, "--stop_after_epoch", "1")) == 0
    assert model_arch.main(_args(mdt_subset, b, 64, *teach, "--resume")) == 0
    assert model_arch.main(_args(mdt_subset, plain, 64)) == 0
    load = lambda d: torch.load(d / "model_checkpoints" / "last_checkpoint.pth", weights_only=True)  # noqa: E731
    la, lb, lp = load(a), load(b), load(plain)
    for k, v in la["state_dict"].items():
        assert torch.equal(v, lb["state_dict"][k]), k
    assert any(not torch.equal(v, lp["state_dict"][k]) for k, v in la["state_dict"].items() if v.is_floating_point())
    recipe = torch.load(a / "model_checkpoints" / "best_covid_model.pth", weights_only=True)["recipe"]
    assert recipe["teacher"] == str(tiny_model.checkpoint) and recipe["distill_temperature"] == 2.0


@pytest.mark.parametrize("flags, word", [(["--distill_alpha", "1.5"], "--distill_alpha"),
                                         (["--distill_temperature", "0"], "--distill_temperature"),
                                         (["--distill_temperature", "nan"], "--distill_temperature"),
                                         (["--distill_alpha", "0.5"], "--teacher"),
                                         (["--teacher", "no_such_teacher.pth"], "no_such_teacher.pth")])
def test_distillation_values_that_would_fail_later_are_refused_up_front(mdt_subset, tmp_path, capsys, flags, word):
    assert model_arch.main(_args(mdt_subset, tmp_path / "o", 32, *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and word in err[-1]


def test_a_teacher_made_for_another_input_size_is_refused_in_one_line(mdt_subset, tiny_model, tmp_path, capsys):
    assert model_arch.main(_args(mdt_subset, tmp_path / "o", 32, "--teacher", str(tiny_model.checkpoint))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "--teacher" in err[-1] and "64 px" in err[-1] and "Traceback" not in "\n".join(err)


def test_extract_member_writes_one_member_that_computes_what_it_did_inside_the_ensemble(tmp_path):
    torch.manual_seed(0)
    cfg = make_config("tiny", num_classes=4, ensemble_size=2)
    ens = build_model(cfg).eval()
    names = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    src = tmp_path / "ens.pth"
    torch.save(make_checkpoint(ens, cfg, names, 32, ensemble={"members": [{"file": "a"}, {"file": "b"}]}), src)
    out = tmp_path / "m1.pth"
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "scripts" / "extract_member.py"),  # noqa: E731
                                     "--checkpoint", *a], capture_output=True, text=True)
    assert run(str(src), "--member", "1", "--out", str(out)).returncode == 0
    member, ck = model_from_checkpoint(out)
    assert ck["model_config"]["ensemble_size"] == 1 and ck["extracted_from"]["file"] == "b"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(member(x).classification, ens.members[1](x).classification)
    bad = run(str(src), "--member", "2", "--out", str(tmp_path / "x.pth"))
    assert bad.returncode == 2 and "members 0 to 1" in bad.stderr and "Traceback" not in bad.stderr
    assert load_checkpoint(out)["class_names"] == names


def test_a_distilled_run_resumes_only_with_its_own_teacher(mdt_subset, tiny_model, tmp_path, capsys):
    out = tmp_path / "r"
    teach = ["--teacher", str(tiny_model.checkpoint)]
    assert model_arch.main(_args(mdt_subset, out, 64, *teach, "--stop_after_epoch", "1")) == 0
    before = (out / "model_checkpoints" / "last_checkpoint.pth").read_bytes()
    assert model_arch.main(_args(mdt_subset, out, 64, "--resume")) == 2  # the teacher dropped halfway
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "--teacher" in err[-1] and "Traceback" not in "\n".join(err)
    assert (out / "model_checkpoints" / "last_checkpoint.pth").read_bytes() == before


def test_extract_member_names_a_missing_checkpoint_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "extract_member.py"), "--checkpoint",
                        str(tmp_path / "nope.pth"), "--out", str(tmp_path / "m.pth")], capture_output=True, text=True)
    assert r.returncode == 2 and "nope.pth" in r.stderr and "Traceback" not in r.stderr


def test_each_member_loses_its_own_prior_correction():
    """Members of other folds carry slightly different offsets; the ensemble records each one."""
    torch.manual_seed(0)
    ens = build_model(make_config("tiny", num_classes=4, ensemble_size=2))
    before = [b.bias.detach().clone() for b in ens.class_outputs()]
    offsets = [[1.0, 0.0, 0.0, -1.0], [0.0, 2.0, 0.0, 0.0]]
    ck = {"prior_correction": {"logit_offset": offsets[0]},
          "ensemble": {"members": [{"prior_correction": {"logit_offset": o}} for o in offsets]}}
    remove_prior_correction(ens, ck)
    for b, o, off in zip(ens.class_outputs(), before, offsets):
        torch.testing.assert_close(b.bias, o - torch.tensor(off))
