"""Reliability findings (issue 9 F1-F8, issue 15 R1-R8; index in tests/inference/test_reliability_inference.py)
about the command-line contract: one line `error: ...`, exit 2, in every CLI (F4, F5, the R7/R8 misuse table)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cxrkit.cli import export as export_cli
from cxrkit.cli import train as model_arch
from cxrkit.cli import infer_pth as pth_cli
from cxrkit.cli import infer_onnx as onnx_cli
from tests.helpers import CLASSES, assert_one_line_error, real_images


def error_line(capsys) -> str:
    """The CLI's stderr, log records removed, must be ONE line starting with `error:`."""
    return assert_one_line_error(capsys, log_lines_ok=True)


# ============================================================================ F4: class list vs outputs
def test_f4_checkpoint_with_fewer_class_names_than_outputs_is_refused(tiny_model, mdt_subset, tmp_path, capsys):
    from cxrkit.core.checkpoint import (CheckpointError, atomic_torch_save, load_checkpoint,
                                        model_from_checkpoint)
    ck = load_checkpoint(tiny_model.checkpoint)
    ck["class_names"] = CLASSES[:3]
    bad = tmp_path / "three.pth"
    atomic_torch_save(ck, bad)
    with pytest.raises(CheckpointError, match="3 class names"):
        model_from_checkpoint(bad)
    img = str(sorted(mdt_subset.glob("Normal/images/*.png"))[0])
    assert pth_cli.main(["--checkpoint", str(bad), "--images", img, "--device", "cpu", "--quiet",
                         "--save_dir", str(tmp_path / "o")]) == 2
    assert "3 class names" in error_line(capsys) and not (tmp_path / "o" / "predictions.csv").exists()
    assert export_cli.main(["--checkpoint", str(bad), "--onnx_path", str(tmp_path / "m.onnx")]) == 2
    assert "4 class outputs" in error_line(capsys)
    assert model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(tmp_path / "e"), "--quiet",
                            "--evaluate", str(bad)]) == 2
    assert "3 class names" in error_line(capsys)


# ======================================================================== F5: unreadable model files
def _bad_model_files(tiny_model, d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    ck_bytes, onnx_bytes = tiny_model.checkpoint.read_bytes(), tiny_model.onnx.read_bytes()
    files = {"empty": (b"", b""), "truncated": (ck_bytes[:len(ck_bytes) // 2], onnx_bytes[:len(onnx_bytes) // 2]),
             "wrong_format": (onnx_bytes, ck_bytes), "text": (b"hello, not a model\n", b"hello, not a model\n")}
    out = {}
    for kind, (ckb, onb) in files.items():
        (d / f"{kind}.pth").write_bytes(ckb)
        (d / f"{kind}.onnx").write_bytes(onb)
        shutil.copy2(tiny_model.meta_path, d / f"{kind}.onnx.meta.json")  # so the model file itself is judged
        out[kind] = (d / f"{kind}.pth", d / f"{kind}.onnx")
    return out


def test_f5_unreadable_model_files_give_one_line_errors_in_every_cli(tiny_model, mdt_subset, tmp_path, capsys):
    """0-byte, truncated, wrong-format and text files as checkpoint / ONNX model, in every CLI."""
    img = str(sorted(mdt_subset.glob("Normal/images/*.png"))[0])
    out = str(tmp_path / "o")
    wrong = []
    for kind, (ck, onnx_file) in _bad_model_files(tiny_model, tmp_path / "bad").items():
        calls = {
            "run_model_pth_inference": lambda: pth_cli.main(["--checkpoint", str(ck), "--images", img, "--quiet",
                                                             "--device", "cpu", "--save_dir", out]),
            "run_onnx_inference": lambda: onnx_cli.main(["--onnx_path", str(onnx_file), "--images", img, "--quiet",
                                                         "--save_dir", out]),
            "run_onnx_inference --gradcam": lambda: onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--gradcam",
                                                                   "--checkpoint", str(ck), "--images", img,
                                                                   "--quiet", "--save_dir", out]),
            "export_to_onnx": lambda: export_cli.main(["--checkpoint", str(ck),
                                                       "--onnx_path", str(tmp_path / "x.onnx")]),
            "model_arch --evaluate": lambda: model_arch.main(["--data_dir", str(mdt_subset), "--quiet", "--evaluate",
                                                              str(ck), "--output_dir", str(tmp_path / "e")]),
        }
        for name, call in calls.items():
            capsys.readouterr()
            try:
                rc = call()
            except Exception as e:  # noqa: BLE001 - a traceback is what this test forbids
                wrong.append(f"{kind} / {name}: {type(e).__name__} raised")
                continue
            err = capsys.readouterr().err
            lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("INFO ", "WARNING "))]
            named = (onnx_file.name if name == "run_onnx_inference" else ck.name)
            if rc != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or named not in lines[0]:
                wrong.append(f"{kind} / {name}: rc {rc}, stderr {err.strip()[-300:]!r}")
            if (tmp_path / "o" / "predictions.csv").exists():
                wrong.append(f"{kind} / {name}: wrote outputs")
    assert not wrong, "\n".join(wrong)


# ------------------------------------- the misuse table: one line, exit 2, in every CLI it concerns
@pytest.fixture(scope="module")
def misuse_files(tiny_model, tmp_path_factory):
    import torch

    from cxrkit.core.checkpoint import atomic_torch_save, load_checkpoint
    d = tmp_path_factory.mktemp("misuse")
    ck = load_checkpoint(tiny_model.checkpoint)
    nan = {**ck, "state_dict": dict(ck["state_dict"])}
    k = next(k for k, v in nan["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    nan["state_dict"][k] = nan["state_dict"][k].clone()
    nan["state_dict"][k].view(-1)[0] = float("nan")
    atomic_torch_save(nan, d / "nan_weight.pth")
    for name, t in (("temperature_0", 0.0), ("temperature_nan", float("nan"))):
        atomic_torch_save({**ck, "temperature": t}, d / f"{name}.pth")
    (d / "existing.onnx").write_bytes(b"somebody's model")
    assert torch.isnan(load_checkpoint(d / "nan_weight.pth")["state_dict"][k]).any()
    return d


# case -> (tools it runs against, extra arguments, what the one line must say)
MISUSE = {
    "workers -1": (("pth", "onnx", "train"), ["--workers", "-1"], "--workers must be >= 0"),
    "batch_size 0": (("pth", "onnx", "train"), ["--batch_size", "0"], "--batch_size must be between 1 and 1024"),
    "batch_size 100000": (("pth", "onnx", "train"), ["--batch_size", "100000"],
                          "--batch_size must be between 1 and 1024"),
    "tiny at 100 px": (("train",), ["--img_size", "100"], "--img_size 100: preset tiny needs a positive multiple of 16"),
    "num_epochs 0": (("train",), ["--num_epochs", "0"], "--num_epochs 0: nothing would be trained"),
    "NaN weight": (("pth", "evaluate", "export"), ["@nan_weight.pth"], "non-finite value(s) (NaN or inf)"),
    "temperature 0": (("pth", "export"), ["@temperature_0.pth"], "temperature must be a finite number > 0"),
    "temperature NaN": (("pth", "export"), ["@temperature_nan.pth"], "temperature must be a finite number > 0"),
    "export over an existing model": (("export",), ["@@existing.onnx"], "--overwrite"),
}
MISUSE_RUNS = [(case, tool) for case, (tools, _, _) in MISUSE.items() for tool in tools]


@pytest.mark.parametrize("case, tool", MISUSE_RUNS, ids=[f"{c}-{t}" for c, t in MISUSE_RUNS])
def test_r7_r8_misuse_table(case, tool, tiny_model, misuse_files, mdt_subset, cxr_eval_dir, tmp_path, capsys):
    _, extra, needle = MISUSE[case]
    ck, onnx_out, flags = tiny_model.checkpoint, tmp_path / "x.onnx", []
    for a in extra:
        if a.startswith("@@"):
            onnx_out = misuse_files / a[2:]
        elif a.startswith("@"):
            ck = misuse_files / a[1:]
        else:
            flags.append(a)
    img = str(real_images(cxr_eval_dir, 1)[0])
    out = tmp_path / "out"
    if tool == "pth":
        rc = pth_cli.main(["--checkpoint", str(ck), "--device", "cpu", "--quiet", "--images", img,
                           "--save_dir", str(out), *flags])
    elif tool == "onnx":
        rc = onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--quiet", "--images", img, "--save_dir", str(out),
                            *flags])
    elif tool == "train":
        rc = model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(out), "--arch", "tiny",
                              "--img_size", "32", "--num_epochs", "1", "--workers", "0", "--quiet", "--device", "cpu",
                              *flags])
    elif tool == "evaluate":
        rc = model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(out), "--quiet", "--device", "cpu",
                              "--evaluate", str(ck)])
    else:
        before = onnx_out.read_bytes() if onnx_out.exists() else None
        rc = export_cli.main(["--checkpoint", str(ck), "--onnx_path", str(onnx_out)])
        assert (onnx_out.read_bytes() if onnx_out.exists() else None) == before
    assert rc == 2
    line = error_line(capsys)
    assert needle in line, line
    if extra[0].startswith("@"):
        assert (onnx_out.name if extra[0].startswith("@@") else ck.name) in line
    assert not (out / "predictions.csv").exists() and not (out / "model_checkpoints" / "best_covid_model.pth").exists()
