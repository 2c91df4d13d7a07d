import pytest
import torch

from hyperbit.config import ModelConfig
from hyperbit.data.digits import load_digits
from hyperbit.models.vit import ViT


def vit_cfg(**kw):
    base = dict(arch="vit", dim=32, n_layers=2, n_heads=4, image_size=8, patch_size=2, channels=1,
                n_classes=10, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def test_patchify_takes_raster_order_patches():
    model = ViT(vit_cfg())
    img = torch.arange(64.0).view(1, 1, 8, 8)
    patches = model.patchify(img)  # (1, 16, 4)
    assert patches.shape == (1, 16, 4)
    assert patches[0, 0].tolist() == [0, 1, 8, 9]  # the top-left 2x2 patch
    assert patches[0, 1].tolist() == [2, 3, 10, 11]  # its right neighbour
    assert patches[0, 4].tolist() == [16, 17, 24, 25]  # the first patch of the second row
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 8, 8\)"):
        model.patchify(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_is_bidirectional(pool):
    """The class token sits at position 0: under causal attention it would see only itself and the
    prediction could not depend on the image. Changing the last pixel must change the logits."""
    torch.manual_seed(0)
    model = ViT(vit_cfg(pool=pool)).eval()
    img = torch.rand(2, 1, 8, 8)
    other = img.clone()
    other[:, :, -1, -1] += 1.0
    with torch.no_grad():
        a, b = model(img)[0], model(other)[0]
    assert a.shape == (2, 10)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("pathway, extra", [("hc", dict(expansion_rate=4)),
                                            ("hc", dict(expansion_rate=2, hc_dynamic=False)),
                                            ("mhc", dict(expansion_rate=4)),
                                            ("frac", dict(frac_rate=4))])
def test_every_pathway_equals_pre_norm_at_init(pathway, extra):
    """Spec section 8.1 for the ViT: same shared weights, same logits and loss gradients."""
    torch.manual_seed(0)
    ref = ViT(vit_cfg())
    model = ViT(vit_cfg(pathway=pathway, **extra))
    missing, _ = model.load_state_dict(ref.state_dict(), strict=False)
    assert not [k for k in missing if "path" not in k]  # only connection parameters are new
    n = model.cfg.expansion_rate  # the output projections were scaled by 1/sqrt(n) at init: undo
    img, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 5, 7])
    la, loss_a = ref(img, y)
    lb, loss_b = model(img, y)
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    for name, p in ref.named_parameters():
        q = dict(model.named_parameters())[name]
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert n >= 1


def test_short_training_beats_chance_by_far():
    torch.manual_seed(0)
    model = ViT(vit_cfg(dim=48, pathway="hc", expansion_rate=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train, test = load_digits("train"), load_digits("test")
    for step in range(150):
        x, y = train.get_batch(step, 64, seed=0)
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x)[0].argmax(-1) == y).sum()) for x, y in test.iter_eval_batches(120))
    accuracy = correct / len(test)
    print(f"digits test accuracy after 150 steps: {accuracy:.3f}")
    assert accuracy > 0.6  # chance is 0.1


@pytest.mark.parametrize("kw", [dict(), dict(pool="mean", pathway="hc", expansion_rate=2),
                                dict(linear="bitnet", channels=3, patch_size=4, n_classes=7)])
def test_count_params_matches_the_model(kw):
    from hyperbit.models import build_model, count_params
    cfg = vit_cfg(**kw)
    model = build_model(cfg)
    assert isinstance(model, ViT)
    assert count_params(cfg) == model.num_params()


@pytest.mark.parametrize("kw", [dict(), dict(pathway="hc", expansion_rate=4), dict(pool="mean"),
                                dict(pathway="mhc", expansion_rate=2), dict(pathway="frac", frac_rate=2)])
def test_wiring_check_passes_and_catches_a_doubled_state(kw):
    import types

    from hyperbit.analysis.wiring import check_wiring
    torch.manual_seed(0)
    model = ViT(vit_cfg(**kw))
    assert check_wiring(model).ok, str(check_wiring(model))

    def forward(self, h):
        h = self.attn_path(h, self.attn)
        h = h + h  # the bug: the branch output doubled, the block's own input lost
        return self.ffn_path(h, self.ffn)

    model.blocks[1].forward = types.MethodType(forward, model.blocks[1])
    report = check_wiring(model)
    assert not report.ok and any(p.startswith("block 1:") for p in report.problems), str(report)
