"""The README's main job, `resnet-fused-check`, on a small model."""
from resnet_fused import check


def test_check_passes_and_reports_every_backend(capsys):
    code = check.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "same parameters as torchvision for the same seed: True" in out
    assert "all within" in out
    for name in check.resnet_fused.available_backends():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
