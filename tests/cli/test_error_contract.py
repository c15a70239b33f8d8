"""THE error contract (cxrkit.cli.common.run_command), checked the same way for every command: a path that
does not exist, or an output whose parent folder is a regular file, is exit code 2 and exactly ONE line on
stderr, `error: ...`, naming the bad path (no traceback). Runs without the real data (SYNTHETIC images)."""
from __future__ import annotations

import pytest

from cxrkit.cli import cv, ensemble, export, infer_onnx, infer_pth, merge, synth, train
from cxrkit.cli import main as umbrella
from cxrkit.core.config import ONNX_PATH
from tests.helpers import REPO, assert_one_line_error

SHIPPED_ONNX = REPO / ONNX_PATH
SHIPPED_CK = REPO / "model_checkpoints" / "best_covid_model.pth"


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A tiny SYNTHETIC database (1 image per class) and a regular file to put outputs under."""
    from cxrkit.training.synthetic import generate
    root = tmp_path_factory.mktemp("contract")
    data = generate(root / "syn", per_class=1, seed=3)
    blocker = root / "a_file"
    blocker.write_text("a regular file, not a folder\n")
    return data, blocker


# (command, case) -> argv builder: f(missing, syn_data, blocker) -> (main, argv, the path the line must name)
MISSING = "no_such_dir/missing"
CASES = {
    ("train", "missing input"): lambda m, d, b: (train.main, ["--data_dir", str(m), "--output_dir", str(b.parent / "t"),
                                                               "--quiet", "--workers", "0"], m),
    ("train", "output under a file"): lambda m, d, b: (train.main, ["--data_dir", str(d), "--output_dir",
                                                                     str(b / "t"), "--quiet", "--workers", "0",
                                                                     "--arch", "tiny", "--img_size", "32"], b / "t"),
    ("evaluate", "missing input"): lambda m, d, b: (umbrella.main, ["evaluate", str(m.with_suffix(".pth")),
                                                                     "--data_dir", str(d), "--quiet",
                                                                     "--output_dir", str(b.parent / "e")],
                                                     m.with_suffix(".pth")),
    ("export", "missing input"): lambda m, d, b: (export.main, ["--checkpoint", str(m.with_suffix(".pth")),
                                                                 "--onnx_path", str(b.parent / "x.onnx")],
                                                   m.with_suffix(".pth")),
    ("export", "output under a file"): lambda m, d, b: (export.main, ["--checkpoint", str(SHIPPED_CK),
                                                                       "--onnx_path", str(b / "x.onnx")],
                                                         b / "x.onnx"),
    ("infer_onnx", "missing input"): lambda m, d, b: (infer_onnx.main, ["--data_dir", str(m), "--onnx_path",
                                                                         str(SHIPPED_ONNX), "--quiet",
                                                                         "--save_dir", str(b.parent / "o")], m),
    ("infer_onnx", "output under a file"): lambda m, d, b: (infer_onnx.main, ["--data_dir", str(d), "--onnx_path",
                                                                               str(SHIPPED_ONNX), "--quiet",
                                                                               "--save_dir", str(b / "o")], b / "o"),
    ("infer_pth", "missing input"): lambda m, d, b: (infer_pth.main, ["--data_dir", str(m), "--checkpoint",
                                                                       str(SHIPPED_CK), "--device", "cpu", "--quiet",
                                                                       "--save_dir", str(b.parent / "p")], m),
    ("infer_pth", "output under a file"): lambda m, d, b: (infer_pth.main, ["--data_dir", str(d), "--checkpoint",
                                                                             str(SHIPPED_CK), "--device", "cpu",
                                                                             "--quiet", "--save_dir", str(b / "p")],
                                                           b / "p"),
    ("merge", "missing input"): lambda m, d, b: (merge.main, [str(m), "--out", str(b.parent / "m")], m),
    ("cv", "missing input"): lambda m, d, b: (cv.main, [str(m), "--out", str(b.parent / "c")], m),
    ("ensemble", "missing input"): lambda m, d, b: (ensemble.main, [str(m.with_suffix(".pth")), str(SHIPPED_CK),
                                                                     "--out", str(b.parent / "ens.pth")],
                                                     m.with_suffix(".pth")),
    ("synth", "output under a file"): lambda m, d, b: (synth.main, ["--out", str(b / "data"), "--per_class", "1"],
                                                        b / "data"),
    ("cxrkit", "unknown command"): lambda m, d, b: (umbrella.main, ["no_such_command", str(m)], "no_such_command"),
}


@pytest.mark.parametrize("command, case", list(CASES), ids=[f"{c}-{k.replace(' ', '_')}" for c, k in CASES])
def test_every_command_reports_a_bad_path_in_one_line_and_exit_2(command, case, syn, tmp_path, capsys):
    data, blocker = syn
    main, argv, bad = CASES[command, case](tmp_path / MISSING, data, blocker)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert_one_line_error(err, str(bad))


def test_a_module_the_lean_install_leaves_out_is_one_line_naming_the_extra(capsys):
    from cxrkit.cli.common import run_command

    def needs_torch():
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    def needs_plots():
        raise ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")

    assert run_command(needs_torch) == 2
    assert_one_line_error(capsys, "needs torch", "pip install 'cxrkit[torch]'", log_lines_ok=True)
    assert run_command(needs_plots) == 2
    assert_one_line_error(capsys, "needs matplotlib", "cxrkit[train]", log_lines_ok=True)

    def bug():
        raise ModuleNotFoundError("No module named 'cxrkit.nothing'", name="cxrkit.nothing")

    with pytest.raises(ModuleNotFoundError):  # a missing module of our own is a bug: traceback
        run_command(bug)
