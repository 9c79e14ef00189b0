"""Explananda and Explainers (pipeline.models): shapes, weights from files only, freezing."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pipeline.models.explanandum as explanandum_module
from pipeline.errors import WysiwycError
from pipeline.models.explainer import build_explainer
from pipeline.models.explanandum import (
    build_explanandum,
    classifier_trainable_parameters,
    freeze_explanandum,
    is_eval_locked,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vgg16():
    return build_explanandum("vgg16", 7)  # 134M parameters: build it once


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "resnet50", "vgg16"])
def test_every_explanandum_gives_one_logit_per_class(arch, request):
    model = request.getfixturevalue("vgg16") if arch == "vgg16" else build_explanandum(arch, 7)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.wysiwyc_arch == arch


@pytest.mark.parametrize(
    "arch,batch,size",
    [
        ("compact", 2, 40),
        ("compact", 1, 37),
        ("resunet", 2, 37),
        ("resunet_os4", 1, 30),
        ("mobileunet", 2, 41),
        ("deeplabv3_mobilenet_v3_large", 1, 64),
        ("deeplabv3_resnet50", 1, 64),
    ],
)
def test_every_explainer_gives_per_class_logits_at_the_input_size(arch, batch, size):
    model = build_explainer(arch, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size + 3))
    assert isinstance(out, torch.Tensor) and out.shape == (batch, 4, size, size + 3)


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
@pytest.mark.parametrize("ask", [True, "imagenet"])
def test_pretrained_backbone_without_a_file_says_how_to_provide_one(arch, ask):
    with pytest.raises(
        WysiwycError, match=rf"explanandum.pretrained_backbone.*torchvision {arch} state dict.*download it once"
    ):
        build_explanandum(arch, 3, pretrained_backbone=ask)


def test_missing_backbone_file_says_how_to_provide_one(tmp_path):
    with pytest.raises(
        WysiwycError, match=r"file not found.*set explanandum.pretrained_backbone to a local path or s3://"
    ):
        build_explanandum("resnet18", 3, pretrained_backbone=tmp_path / "nope.pth")


def test_explainer_backbone_without_a_file_says_how_to_provide_one():
    with pytest.raises(WysiwycError, match=r"explainer.backbone_weights.*resnet50"):
        build_explainer("deeplabv3_resnet50", 3, backbone_weights=True)


def test_imagenet_backbone_loads_from_a_state_dict_file_and_the_head_stays_new(tmp_path):
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    model = build_explanandum("resnet18", 3, pretrained_backbone=str(path))
    torch.testing.assert_close(model.conv1.weight, imagenet.conv1.weight)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.fc.out_features == 3
    # the same file also works as bytes, a file:// URL and a loader callable
    for source in (path.read_bytes(), f"file://{path}", lambda: io.BytesIO(path.read_bytes())):
        other = build_explanandum("resnet18", 3, pretrained_backbone=source)
        torch.testing.assert_close(other.conv1.weight, imagenet.conv1.weight)


def test_a_state_dict_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(build_explanandum("small_cnn", 3).state_dict(), path)
    with pytest.raises(WysiwycError, match="not a torchvision resnet18 state dict"):
        build_explanandum("resnet18", 3, pretrained_backbone=path)
    with pytest.raises(WysiwycError, match="does not fit a small_cnn with 4 classes"):
        build_explanandum("small_cnn", 4, weights=path)


def test_explanandum_weights_round_trip_through_a_checkpoint_file(tmp_path):
    torch.manual_seed(2)
    trained = build_explanandum("small_cnn", 3)
    path = tmp_path / "classifier.pt"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)
    loaded = build_explanandum("small_cnn", 3, weights=path)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_non_local_urls_are_read_through_pipeline_storage(monkeypatch):
    state = build_explanandum("small_cnn", 2).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    opened = []

    def open_read(url, opts=None):
        opened.append(url)
        return io.BytesIO(buffer.getvalue())

    monkeypatch.setattr(explanandum_module.storage, "open_read", open_read)
    loaded = build_explanandum("small_cnn", 2, weights="s3://bucket/ckpt/classifier.pt")
    assert opened == ["s3://bucket/ckpt/classifier.pt"]
    assert torch.equal(loaded.fc.weight, state["fc.weight"])


def test_explainer_backbone_loads_from_a_torchvision_mobilenet_state_dict(tmp_path):
    torch.manual_seed(3)
    imagenet = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet.pth"
    torch.save(imagenet.state_dict(), path)
    model = build_explainer("deeplabv3_mobilenet_v3_large", 3, backbone_weights=path)
    torch.testing.assert_close(model.net.backbone["0"][0].weight, imagenet.features[0][0].weight)


def test_compact_explainer_encoder_starts_from_the_small_cnn_and_learns_even_if_it_is_frozen():
    torch.manual_seed(4)
    classifier = freeze_explanandum(build_explanandum("small_cnn", 3))
    explainer = build_explainer("compact", 3, encoder_from=classifier)
    for i, block in enumerate(classifier.blocks):
        for key, value in block.state_dict().items():
            assert torch.equal(explainer.blocks[i].state_dict()[key], value)
    assert all(p.requires_grad for p in explainer.parameters())
    explainer.train()
    assert explainer.blocks[0][1].training
    with pytest.raises(WysiwycError, match="only for the compact"):
        build_explainer("deeplabv3_mobilenet_v3_large", 3, encoder_from=classifier)


def test_compact_explainer_with_fewer_levels_uses_the_first_blocks_and_reloads_from_its_weights():
    torch.manual_seed(5)
    classifier = freeze_explanandum(build_explanandum("small_cnn", 4))
    x = torch.randn(2, 3, 40, 36)
    # encoder blocks 10,208 + 55,552 (+ 221,696); the decoder at half width: (96→16) 16,192, or (192→32)
    # 64,640 + (64→16) 11,584; the 1×1 head 16·4 + 4
    for levels, params in ((2, 10_208 + 55_552 + 16_192 + 68), (3, 10_208 + 55_552 + 221_696 + 64_640 + 11_584 + 68)):
        explainer = build_explainer("compact", 4, encoder_from=classifier, levels=levels).eval()
        assert len(explainer.blocks) == len(explainer.decoder) + 1 == levels
        assert sum(p.numel() for p in explainer.parameters()) == params
        for i in range(levels):
            assert torch.equal(explainer.blocks[i][0].weight, classifier.blocks[i][0].weight)
        assert explainer(x).shape == (2, 4, 40, 36)
        # a checkpoint carries its levels: the weights alone rebuild the same net
        again = build_explainer("compact", 4, weights=explainer.state_dict()).eval()
        assert len(again.blocks) == levels
        torch.testing.assert_close(again(x), explainer(x), rtol=0, atol=0)
    for bad in (1, 5):
        with pytest.raises(WysiwycError, match=f"explainer.levels={bad}"):
            build_explainer("compact", 4, levels=bad)


def test_compact_explainer_of_another_decoder_width_reloads_with_its_own_width():
    from pipeline.models.explainer import CompactExplainer

    torch.manual_seed(7)
    x = torch.randn(2, 3, 24, 24)
    # a full-width decoder, as the compact Explainers before the half-width default were built
    old = CompactExplainer(3, channels=(32, 64, 128), cam_channels=(128,), decoder_channels=(32, 64)).eval()
    again = build_explainer("compact", 3, weights=old.state_dict()).eval()
    assert again.decoder_channels == (32, 64) and again.cam_channels == (128,)
    torch.testing.assert_close(again(x), old(x), rtol=0, atol=0)
    assert build_explainer("compact", 3, levels=3, cam=True).decoder_channels == (16, 32)


def test_class_activation_branch_starts_as_the_classifiers_own_per_position_evidence():
    torch.manual_seed(6)
    classifier = freeze_explanandum(build_explanandum("small_cnn", 4))
    x = torch.randn(2, 3, 40, 36)
    # the 4-level encoder is the whole small_cnn: the branch is its linear layer at every position
    explainer = build_explainer("compact", 4, encoder_from=classifier, levels=4, cam=True).eval()
    assert len(explainer.cam_blocks) == 0
    deepest = classifier.encode(x)[-1]  # (2, 128, 5, 4)
    cam = torch.einsum("bchw,kc->bkhw", deepest, classifier.fc.weight) + classifier.fc.bias[:, None, None]
    torch.testing.assert_close(explainer.cam_fc(deepest), cam)
    # the Explainer's logits are the U-Net's plus the upsampled branch
    without = build_explainer("compact", 4, encoder_from=classifier, levels=4).eval()
    without.load_state_dict({k: v for k, v in explainer.state_dict().items() if not k.startswith("cam_")})
    upsampled = F.interpolate(cam, size=(40, 36), mode="bilinear", align_corners=False)
    torch.testing.assert_close(explainer(x), without(x) + upsampled)
    # 3 levels: the branch continues with the classifier's 4th block
    explainer = build_explainer("compact", 4, encoder_from=classifier, levels=3, cam=True).eval()
    assert [len(explainer.blocks), len(explainer.cam_blocks)] == [3, 1]
    assert torch.equal(explainer.cam_blocks[0][0].weight, classifier.blocks[3][0].weight)
    assert torch.equal(explainer.cam_fc.weight[:, :, 0, 0], classifier.fc.weight)
    assert explainer(x).shape == (2, 4, 40, 36)
    # a checkpoint carries the branch: the weights alone rebuild the same net
    again = build_explainer("compact", 4, weights=explainer.state_dict()).eval()
    assert again.cam_channels == (128,)
    torch.testing.assert_close(again(x), explainer(x), rtol=0, atol=0)
    # and a checkpoint without it stays without
    assert build_explainer("compact", 4, weights=without.state_dict()).cam_channels is None
    with pytest.raises(WysiwycError, match="explainer.cam is only for the compact"):
        build_explainer("deeplabv3_mobilenet_v3_large", 4, cam=True)


def test_black_box_class_activation_branch_is_the_explainers_own_classifier():
    # without a classifier to copy, the branch continues the encoder with the compact net's own channels
    torch.manual_seed(7)
    explainer = build_explainer("compact", 5, levels=3, cam=True).eval()
    assert explainer.channels == (32, 64, 128) and explainer.cam_channels == (128,)
    x = torch.randn(2, 3, 40, 36)
    # class_logits: the branch's features max-pooled over positions, then its linear layer (whose per-position
    # application is the class-activation map added to the masks); forward(classify=True) the same
    features = explainer.cam_blocks[0](explainer.pool(explainer._encode(x)[-1]))  # (2, 128, 5, 4)
    expected = features.amax(dim=(-2, -1)) @ explainer.cam_fc.weight[:, :, 0, 0].T + explainer.cam_fc.bias
    torch.testing.assert_close(explainer.class_logits(x), expected)
    torch.testing.assert_close(explainer(x, classify=True), explainer.class_logits(x))
    assert build_explainer("compact", 5, cam=True).cam_channels == ()  # 4 levels: the fc on the deepest
    with pytest.raises(WysiwycError, match="class_logits needs the class-activation branch"):
        build_explainer("compact", 5).class_logits(x)


@pytest.mark.parametrize("arch", ["resunet", "resunet_os4", "mobileunet"])
def test_unet_explainers_class_head_is_a_linear_layer_on_mean_and_max_and_its_map_the_same_layer(arch):
    torch.manual_seed(3)
    explainer = build_explainer(arch, 5, cam=True).eval()
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        z = explainer.cam_block(explainer._encode(x)[-1])
        pooled = torch.cat([z.mean(dim=(-2, -1)), z.amax(dim=(-2, -1))], dim=1)
        torch.testing.assert_close(
            explainer(x, classify=True), pooled @ explainer.cam_fc.weight.T + explainer.cam_fc.bias
        )
        # per position: the same layer applied to (z, z), i.e. its two halves summed, added upsampled to the masks
        cam = torch.einsum("bchw,kc->bkhw", torch.cat([z, z], dim=1), explainer.cam_fc.weight)
        cam = cam + explainer.cam_fc.bias[:, None, None]
        without = build_explainer(arch, 5).eval()
        without.load_state_dict({k: v for k, v in explainer.state_dict().items() if not k.startswith("cam_")})
        upsampled = F.interpolate(cam, size=(40, 36), mode="bilinear", align_corners=False)
        torch.testing.assert_close(explainer(x), without(x) + upsampled)
        # a checkpoint's weights rebuild the same net, with or without the branch
        again = build_explainer(arch, 5, weights=explainer.state_dict()).eval()
        torch.testing.assert_close(again(x), explainer(x), rtol=0, atol=0)
    assert build_explainer(arch, 5, weights=without.state_dict()).cam_channels is None
    resolution = {"resunet": 5, "resunet_os4": 10, "mobileunet": 5}[arch]  # 40 px: 1/8, dilated 1/4
    assert z.shape[-2] == resolution
    with pytest.raises(WysiwycError, match="neither backbone weights, explanandum_copy nor levels"):
        build_explainer(arch, 5, levels=3)


def test_freeze_keeps_eval_mode_through_train_calls_copies_and_pickling():
    model = freeze_explanandum(build_explanandum("small_cnn", 3))
    parent = nn.Sequential(model, nn.Dropout())
    parent.train()
    model.train()
    model.blocks[0].train(True)
    assert not any(m.training for m in model.modules())
    assert parent[1].training
    assert all(not p.requires_grad for p in model.parameters())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert is_eval_locked(clone)
        assert not any(m.training for m in clone.modules())


def test_classifier_fine_tune_trains_only_the_new_head_and_keeps_the_backbone_in_eval():
    resnet = build_explanandum("resnet18", 3)
    assert classifier_trainable_parameters(resnet) == list(resnet.fc.parameters())
    assert [n for n, p in resnet.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    resnet.train()
    assert not resnet.bn1.training and not resnet.layer1[0].bn1.training
    assert resnet.fc.training
    small = build_explanandum("small_cnn", 3)
    assert len(classifier_trainable_parameters(small)) == len(list(small.parameters()))


def test_vgg16_head_is_the_papers_three_layer_head(vgg16):
    model = vgg16
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(25088, 4096), (4096, 4096), (4096, 7)]
    assert sum(isinstance(m, nn.Dropout) for m in model.classifier) == 2
    assert classifier_trainable_parameters(model) == list(model.classifier.parameters())
    assert not any(p.requires_grad for p in model.features.parameters())


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(WysiwycError, match="unknown architecture 'alexnet'"):
        build_explanandum("alexnet", 3)
    with pytest.raises(WysiwycError, match="unknown architecture"):
        build_explainer("unet", 3)


def test_vgg16_takes_only_the_features_from_an_imagenet_state_dict(vgg16):
    imagenet = {f"features.{k}": v + 1.0 for k, v in vgg16.features.state_dict().items()}
    imagenet["classifier.6.weight"] = torch.zeros(1000, 4096)  # the ImageNet head is ignored
    model = build_explanandum("vgg16", 7, pretrained_backbone=lambda: imagenet)
    torch.testing.assert_close(model.features[0].weight, imagenet["features.0.weight"])
    assert model.classifier[6].out_features == 7
