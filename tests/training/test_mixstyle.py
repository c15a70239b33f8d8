"""MixStyle (--mixstyle, issue 22 lever g): feature statistics mixed across films in training only,
reproducibly, and never in eval mode, the checkpoint's weights' meaning or the exported graph."""
import torch

from cxrkit.cli import train as model_arch
from cxrkit.core.config import make_config
from cxrkit.core.model import build_model
from cxrkit.training.mixstyle import StyleMix


def _lite0():
    torch.manual_seed(0)
    return build_model(make_config("lite0", num_classes=4))


def test_style_layers_are_early_encoder_blocks_of_every_network():
    lite0 = _lite0()
    assert len(lite0.style_layers()) == 3
    assert all(any(layer is b for b in lite0.encoder._blocks) for layer in lite0.style_layers())
    tiny = build_model(make_config("tiny", num_classes=4))
    assert len(tiny.style_layers()) == 2
    ens = build_model(make_config("lite0", num_classes=4, ensemble_size=2))
    assert len(ens.style_layers()) == 6


def test_mixing_gives_each_film_the_blend_of_its_own_and_its_partners_statistics():
    layer = torch.nn.Identity()
    holder = torch.nn.Module()
    holder.style_layers = lambda: [layer]
    mix = StyleMix(holder, p=1.0, alpha=0.1)
    x = torch.randn(6, 4, 8, 8) * torch.arange(1, 7).view(6, 1, 1, 1) + torch.arange(6).view(6, 1, 1, 1)
    mix.next_batch(6, torch.Generator().manual_seed(1))
    perm, lam = mix.draw
    out = layer(x)
    mu, sd = x.mean(dim=(2, 3)), x.var(dim=(2, 3)).sqrt()
    lam2 = lam.view(-1, 1)
    torch.testing.assert_close(out.mean(dim=(2, 3)), lam2 * mu + (1 - lam2) * mu[perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.var(dim=(2, 3)).sqrt(), lam2 * sd + (1 - lam2) * sd[perm], atol=1e-3, rtol=1e-3)
    layer.eval()
    assert torch.equal(layer(x), x)  # eval mode: untouched


def test_draws_are_reproducible_and_the_share_of_mixed_batches_follows_p():
    holder = torch.nn.Module()
    holder.style_layers = lambda: []
    always = StyleMix(holder, p=1.0, alpha=0.1)
    draws = []
    for _ in range(2):
        always.next_batch(8, torch.Generator().manual_seed(3))
        draws.append(always.draw)
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert sorted(draws[0][0].tolist()) == list(range(8)) and bool(((draws[0][1] >= 0) & (draws[0][1] <= 1)).all())
    mix = StyleMix(holder, p=0.5, alpha=0.1)
    gen = torch.Generator().manual_seed(0)
    mixed = 0
    for _ in range(400):
        mix.next_batch(8, gen)
        mixed += mix.draw is not None
    assert 150 < mixed < 250


def test_a_network_in_training_changes_and_in_eval_does_not():
    model = _lite0()
    x = torch.rand(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ref = model(x).classification
    mix = StyleMix(model, p=1.0, alpha=0.1)
    mix.next_batch(4, torch.Generator().manual_seed(0))

    def train_forward():
        torch.manual_seed(0)  # the same dropout masks: only the hooks can differ
        return model(x)
    with torch.no_grad():
        assert torch.equal(model(x).classification, ref)  # eval (what is exported): no effect
        model.train()
        mixed, again = train_forward(), train_forward()
        mix.remove()
        plain = train_forward()
    assert torch.equal(mixed.classification, again.classification)
    assert not torch.allclose(mixed.classification, plain.classification)
    assert not torch.allclose(mixed.segmentation, plain.segmentation)


def test_the_multiscale_classifier_pools_the_mixed_levels():
    """The MONAI networks' multiscale head pools its levels' outputs through hooks registered at build
    time; MixStyle's run first, so the pooled means (the style statistics themselves) are the mixed ones."""
    torch.manual_seed(0)
    model = build_model(make_config("tiny", num_classes=4)).train()
    assert model.cfg.cls_source == "multiscale"
    mix = StyleMix(model, p=1.0, alpha=0.1)
    mix.next_batch(4, torch.Generator().manual_seed(0))
    seen = {}
    # the level's own output, before any other hook changes it
    model.style_layers()[0].register_forward_hook(lambda _m, _i, out: seen.__setitem__("level0", out), prepend=True)
    model.cls_head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("pooled", args[0]))
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    perm, lam = mix.draw
    mu, lam = seen["level0"].mean(dim=(2, 3)), lam.view(-1, 1)
    torch.testing.assert_close(seen["pooled"][:, :mu.shape[1]], lam * mu + (1 - lam) * mu[perm], atol=1e-5, rtol=1e-4)


def test_a_mixstyle_run_is_recorded_and_resumes_bit_identically(mdt_subset, tmp_path):
    def args(out, *extra):
        return ["--data_dir", str(mdt_subset), "--output_dir", str(out), "--arch", "tiny", "--img_size", "32",
                "--num_epochs", "2", "--batch_size", "8", "--workers", "0", "--quiet", "--device", "cpu",
                "--mixstyle", "1.0", *extra]
    a, b, plain = tmp_path / "a", tmp_path / "b", tmp_path / "plain"
    assert model_arch.main(args(a)) == 0
    assert model_arch.main(args(b, "--stop_after_epoch", "1")) == 0
    assert model_arch.main(args(b, "--resume")) == 0
    assert model_arch.main(args(plain)[:-2] + ["--mixstyle", "0"]) == 0
    load = lambda d: torch.load(d / "model_checkpoints" / "last_checkpoint.pth", weights_only=True)  # noqa: E731
    la, lb, lp = load(a), load(b), load(plain)
    for k, v in la["state_dict"].items():
        assert torch.equal(v, lb["state_dict"][k]), k
    assert any(not torch.equal(v, lp["state_dict"][k]) for k, v in la["state_dict"].items() if v.is_floating_point())
    best = torch.load(a / "model_checkpoints" / "best_covid_model.pth", weights_only=True)
    assert best["recipe"]["mixstyle"] == 1.0


def test_half_precision_activations_keep_their_dtype():
    layer = torch.nn.Identity()
    holder = torch.nn.Module()
    holder.style_layers = lambda: [layer]
    mix = StyleMix(holder, p=1.0, alpha=0.1)
    mix.next_batch(4, torch.Generator().manual_seed(0))
    out = layer(torch.randn(4, 8, 6, 6).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
