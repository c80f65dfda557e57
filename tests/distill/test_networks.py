"""Networks: MTT's shapes and parameter order, exact heads, seeded construction, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharp_bilevel.distill.networks import (
    MLP,
    VGG11,
    AlexNet,
    ConvNet,
    ConvNetD4,
    ConvNetD5,
    ResNet18,
    available_networks,
    get_network,
)

ALL_NAMES = [
    "ConvNet",
    "ConvNetD4",
    "ConvNetD5",
    "ConvNetBN",
    "ConvNetNoNorm",
    "MLP",
    "AlexNet",
    "VGG11",
    "ResNet18",
]
SIZES = [(1, (8, 8)), (1, (28, 28)), (3, (32, 32))]
SMALL = 8  # width used wherever a test runs a network


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def fits(name: str, channels: int, size: tuple[int, int]) -> bool:
    """Whether MTT's pooling schedule leaves a non-empty map (ConvNetD4/D5 need larger images)."""
    depth = {"convnetd4": 4, "convnetd5": 5}.get(name.lower(), 0)
    if depth == 0:
        return True
    h = size[0] + (4 if channels == 1 else 0)  # first conv pads by 3 for 1-channel inputs
    return h >> depth >= 1


# ------------------------------------------------------------------------------------------
# MTT's parameter counts and order


@pytest.mark.parametrize(
    ("channels", "size", "expected"),
    [(1, (8, 8), 298_506), (3, (8, 8), 300_810), (3, (32, 32), 320_010)],
)
def test_convnet_parameter_count_equals_mtt(
    channels: int, size: tuple[int, int], expected: int
) -> None:
    assert n_params(ConvNet(channels, 10, size)) == expected
    assert n_params(get_network("ConvNet", channels, 10, size)) == expected


def test_cross_architecture_parameter_counts_equal_mtt_arithmetic() -> None:
    def conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
        return cin * cout * k * k + (cout if bias else 0)

    alex = (
        conv(3, 128, 5)
        + conv(128, 192, 5)
        + conv(192, 256, 3)
        + conv(256, 192, 3)
        + conv(192, 192, 3)
        + (192 * 4 * 4 * 10 + 10)
    )
    assert n_params(AlexNet(3, 10, (32, 32))) == alex == 1_872_202

    vgg_widths = [64, 128, 256, 256, 512, 512, 512, 512]
    vgg = sum(conv(i, o, 3) + 2 * o for i, o in zip([3, *vgg_widths[:-1]], vgg_widths, strict=True))
    assert n_params(VGG11(3, 10, (32, 32))) == vgg + 512 * 10 + 10 == 9_231_114

    def block(cin: int, cout: int) -> int:
        short = conv(cin, cout, 1, bias=False) + 2 * cout if cin != cout else 0
        return conv(cin, cout, 3, bias=False) + conv(cout, cout, 3, bias=False) + 4 * cout + short

    res = conv(3, 64, 3, bias=False) + 2 * 64 + 512 * 10 + 10
    for cin, cout in [(64, 64), (64, 128), (128, 256), (256, 512)]:
        res += block(cin, cout) + block(cout, cout)
    assert n_params(ResNet18(3, 10, (32, 32))) == res == 11_173_962


def test_convnet_parameter_names_and_order_follow_mtt() -> None:
    net = ConvNet(1, 10, (8, 8), width=SMALL, depth=3)
    names = [name for name, _ in net.named_parameters()]
    expected = []
    for d in range(3):
        expected += [f"features.conv{d}.weight", f"features.conv{d}.bias"]
        expected += [f"features.norm{d}.weight", f"features.norm{d}.bias"]
    assert names == [*expected, "classifier.weight", "classifier.bias"]
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes[:4] == [(SMALL, 1, 3, 3), (SMALL,), (SMALL,), (SMALL,)]
    assert shapes[4] == (SMALL, SMALL, 3, 3)
    assert shapes[-2:] == [(10, SMALL), (10,)]

    no_norm = [n for n, _ in ConvNet(3, 10, (8, 8), width=SMALL, norm="none").named_parameters()]
    assert no_norm == [
        "features.conv0.weight",
        "features.conv0.bias",
        "features.conv1.weight",
        "features.conv1.bias",
        "features.conv2.weight",
        "features.conv2.bias",
        "classifier.weight",
        "classifier.bias",
    ]


def test_convnet_norm_layers_are_mtts() -> None:
    def first_norm(norm: str) -> nn.Module:
        return ConvNet(3, 10, (8, 8), width=SMALL, norm=norm).features.norm0

    inst = first_norm("instancenorm")
    assert isinstance(inst, nn.GroupNorm)
    assert (inst.num_groups, inst.num_channels, inst.affine) == (SMALL, SMALL, True)
    assert isinstance(first_norm("batchnorm"), nn.BatchNorm2d)
    assert isinstance(first_norm("layernorm"), nn.GroupNorm)
    assert first_norm("layernorm").num_groups == 1
    assert first_norm("groupnorm").num_groups == 4
    assert isinstance(
        ConvNet(3, 10, (8, 8), width=SMALL, pool="maxpool").features.pool0, nn.MaxPool2d
    )
    assert isinstance(
        ConvNet(3, 10, (8, 8), width=SMALL, pool="maxpooling").features.pool0, nn.MaxPool2d
    )
    assert isinstance(ConvNet(3, 10, (8, 8), width=SMALL, act="sigmoid").features.act0, nn.Sigmoid)
    assert isinstance(ResNet18(3, 10, (8, 8), width=8).bn1, nn.BatchNorm2d)
    assert isinstance(ResNet18(3, 10, (8, 8), width=8, norm="instancenorm").bn1, nn.GroupNorm)
    assert isinstance(VGG11(3, 10, (8, 8), width=8).features.norm0, nn.GroupNorm)
    assert isinstance(
        VGG11(3, 10, (8, 8), width=8, norm="batchnorm").features.norm0, nn.BatchNorm2d
    )
    assert not any(isinstance(m, nn.GroupNorm) for m in AlexNet(3, 10, (8, 8), width=8).modules())
    assert isinstance(
        AlexNet(3, 10, (8, 8), width=8, norm="instancenorm").features.norm0, nn.GroupNorm
    )


# ------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize(("channels", "size"), SIZES)
def test_every_network_maps_a_batch_to_logits(
    name: str, channels: int, size: tuple[int, int]
) -> None:
    if not fits(name, channels, size):
        with pytest.raises(ValueError, match="depth"):
            get_network(name, channels, 10, size, width=SMALL)
        return
    net = get_network(name, channels, 10, size, width=SMALL)
    out = net(torch.randn(2, channels, *size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_convnet_runs_on_1x8x8_at_every_depth_mtt_crashes_on(depth: int) -> None:
    net = ConvNet(1, 10, (8, 8), width=SMALL, depth=depth)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("channels", "size", "depth"), [(1, (2, 2), 5), (3, (4, 4), 3), (3, (32, 8), 4)]
)
def test_convnet_too_deep_for_the_image_raises(
    channels: int, size: tuple[int, int], depth: int
) -> None:
    with pytest.raises(ValueError, match=r"depth=.*image_size"):
        ConvNet(channels, 10, size, width=SMALL, depth=depth)
    with pytest.raises(ValueError, match=r"depth=.*image_size"):
        get_network("ConvNet", channels, 10, size, width=SMALL, depth=depth)


def expected_head_features(
    channels: int, h: int, w: int, depth: int, width: int, pool: bool = True
) -> int:
    """Hand arithmetic: a 3x3 conv with padding p adds 2p - 2, a 2x2 pool halves (floor)."""
    sizes = [h, w]
    for d in range(depth):
        grow = 4 if (channels == 1 and d == 0) else 0
        sizes = [s + grow for s in sizes]
        if pool:
            sizes = [s // 2 for s in sizes]
    return width * sizes[0] * sizes[1]


@pytest.mark.parametrize(
    ("channels", "size", "depth", "pool"),
    [
        (1, (8, 8), 1, True),
        (1, (8, 8), 2, True),
        (1, (8, 8), 3, True),
        (3, (8, 8), 2, True),
        (1, (28, 28), 3, True),
        (3, (28, 28), 3, True),
        (3, (32, 32), 3, True),
        (1, (7, 13), 2, True),
        (3, (64, 64), 4, True),
        (3, (33, 17), 4, True),
        (1, (5, 6), 2, False),
    ],
)
def test_convnet_head_size_equals_hand_arithmetic(
    channels: int, size: tuple[int, int], depth: int, pool: bool
) -> None:
    net = ConvNet(channels, 3, size, width=4, depth=depth, pool="avgpool" if pool else "none")
    expected = expected_head_features(channels, *size, depth, width=4, pool=pool)
    assert net.classifier.in_features == expected
    assert net.embed(torch.zeros(1, channels, *size)).shape == (1, expected)


def test_mtt_head_guess_is_kept_where_it_was_right() -> None:
    # MTT treats 28x28 as 32x32, which is exact for 1 channel: 2048 features at depth 3.
    assert ConvNet(1, 10, (28, 28)).classifier.in_features == 128 * 4 * 4
    assert ConvNetD4(3, 10, (64, 64), width=SMALL).classifier.in_features == SMALL * 4 * 4
    assert ConvNetD5(3, 10, (128, 128), width=SMALL).classifier.in_features == SMALL * 4 * 4


def test_input_of_another_size_is_rejected_by_name() -> None:
    net = ConvNet(3, 10, (8, 8), width=SMALL)
    with pytest.raises(ValueError, match=r"\[batch, 3, 8, 8\]"):
        net(torch.zeros(2, 3, 9, 9))


# ------------------------------------------------------------------------------------------
# an independent float64 reference of the architecture


@pytest.mark.parametrize(("channels", "size", "depth"), [(1, (8, 8), 3), (3, (16, 12), 2)])
def test_convnet_equals_a_hand_written_forward(
    channels: int, size: tuple[int, int], depth: int
) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ConvNet(channels, 5, size, width=8, depth=depth).double()
        for p in net.parameters():  # make the norm affine parameters non-trivial
            p.data.add_(0.1 * torch.randn_like(p))
        x = torch.randn(3, channels, *size, dtype=torch.float64)
    params = list(net.parameters())  # MTT's flat order: (conv w, conv b, norm w, norm b) * depth
    out = x
    for d in range(depth):
        conv_w, conv_b, norm_w, norm_b = params[4 * d : 4 * d + 4]
        out = F.conv2d(out, conv_w, conv_b, padding=3 if channels == 1 and d == 0 else 1)
        out = F.group_norm(out, out.shape[1], norm_w, norm_b, eps=1e-5)
        out = F.avg_pool2d(F.relu(out), kernel_size=2, stride=2)
    ref = F.linear(out.reshape(out.shape[0], -1), params[-2], params[-1])
    torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# get_network


def test_available_networks_lists_every_name() -> None:
    assert available_networks() == ALL_NAMES


def test_same_seed_gives_identical_weights_and_other_seeds_differ() -> None:
    a = get_network("ConvNet", 3, 10, (8, 8), seed=7, width=SMALL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # the global state must not matter
        b = get_network("ConvNet", 3, 10, (8, 8), seed=7, width=SMALL)
    c = get_network("ConvNet", 3, 10, (8, 8), seed=8, width=SMALL)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.features.conv0.weight, c.features.conv0.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_get_network_uses_pytorchs_default_initialisation_in_construction_order() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        direct = ConvNet(1, 10, (8, 8), width=SMALL)
    seeded = get_network("convnet", 1, 10, (8, 8), seed=3, width=SMALL)
    for pa, pb in zip(direct.parameters(), seeded.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_get_network_leaves_the_global_rng_untouched(name: str) -> None:
    before = torch.get_rng_state()
    get_network(name, 3, 10, (32, 32), seed=5, width=8)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ValueError, match="depth"):
        get_network("ConvNetD5", 3, 10, (8, 8), seed=5, width=8)  # also on the error path
    assert torch.equal(torch.get_rng_state(), before)
    expected_draw = torch.rand(3, generator=torch.Generator().set_state(before))
    assert torch.equal(torch.rand(3), expected_draw)


def test_names_are_case_insensitive() -> None:
    for spelling, cls in [
        ("convnet", ConvNet),
        ("CONVNETD4", ConvNetD4),
        ("convnetd5", ConvNetD5),
        ("mlp", MLP),
        ("alexnet", AlexNet),
        ("vgg11", VGG11),
        ("resnet18", ResNet18),
    ]:
        assert type(get_network(spelling, 3, 10, (32, 32), width=8)) is cls
    bn = get_network("convnetbn", 3, 10, (8, 8), width=SMALL)
    assert isinstance(bn.features.norm0, nn.BatchNorm2d)
    plain = get_network("ConvNetNONORM", 3, 10, (8, 8), width=SMALL)
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in plain.modules())


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown network 'LeNet'") as info:
        get_network("LeNet", 3, 10, (32, 32))
    for name in ALL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"channels": 0}, "channels"),
        ({"channels": 2.0}, "channels"),
        ({"num_classes": -1}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"image_size": (8,)}, "image_size"),
        ({"image_size": (0, 8)}, "image_size"),
        ({"image_size": 8}, "image_size"),
        ({"width": 0}, "width"),
        ({"depth": 0}, "depth"),
        ({"norm": "weird"}, "norm.*instancenorm"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, object], pattern: str) -> None:
    args: dict[str, object] = {"channels": 3, "num_classes": 10, "image_size": (8, 8)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        get_network("ConvNet", **args)  # type: ignore[arg-type]


def test_options_a_network_does_not_take_are_rejected() -> None:
    with pytest.raises(ValueError, match="MLP takes no depth"):
        get_network("MLP", 3, 10, (8, 8), depth=2)
    with pytest.raises(ValueError, match="MLP takes no norm"):
        get_network("MLP", 3, 10, (8, 8), norm="batchnorm")
    with pytest.raises(ValueError, match="depth=4"):
        get_network("ConvNetD4", 3, 10, (64, 64), depth=3)
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        get_network("ConvNetBN", 3, 10, (8, 8), norm="instancenorm")
    assert isinstance(get_network("ConvNetD4", 3, 10, (64, 64), depth=4, width=4), ConvNetD4)
    assert get_network("ConvNet", 3, 10, (32, 32), depth=4, width=4).feature_shape == (4, 2, 2)


def test_constructor_choices_are_validated() -> None:
    with pytest.raises(ValueError, match=r"act.*relu, sigmoid, leakyrelu"):
        ConvNet(3, 10, (8, 8), act="tanh")
    with pytest.raises(ValueError, match=r"pool.*avgpool"):
        ConvNet(3, 10, (8, 8), pool="median")
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvNet(3, 10, (8, 8), width=6, norm="groupnorm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_weights_equal_cpu_weights_and_cuda_rng_is_untouched() -> None:
    cuda_state = torch.cuda.get_rng_state()
    on_gpu = get_network("ConvNet", 3, 10, (8, 8), seed=1, width=SMALL, device="cuda")
    on_cpu = get_network("ConvNet", 3, 10, (8, 8), seed=1, width=SMALL)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    for pg, pc in zip(on_gpu.parameters(), on_cpu.parameters(), strict=True):
        assert pg.device.type == "cuda"
        assert torch.equal(pg.cpu(), pc)


# ------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, (8, 8)), (3, (32, 32))])
def test_every_parameter_gets_a_finite_nonzero_gradient(
    name: str, channels: int, size: tuple[int, int]
) -> None:
    if not fits(name, channels, size):
        pytest.skip("too deep for 8x8 (covered by the shape test)")
    net = get_network(name, channels, 10, size, seed=0, width=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        x = torch.randn(4, channels, *size)
    F.cross_entropy(net(x), torch.arange(4)).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("cls", [VGG11, ResNet18])
def test_instance_norm_variants_have_live_gradients_on_8x8(cls: type[nn.Module]) -> None:
    # Instance norm over a 1x1 map is constant; the small-image adaptation avoids it.
    net = cls(1, 10, (8, 8), width=8, norm="instancenorm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        x = torch.randn(2, 1, 8, 8)
        y = torch.tensor([0, 1])
    F.cross_entropy(net(x), y).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname


def test_the_old_import_path_still_holds_every_name() -> None:
    """The split into `distill.nets` keeps `distill.networks` working: every name it exported
    before is there and is the object its new module defines."""
    from sharp_bilevel.distill import networks
    from sharp_bilevel.distill.nets import blocks, convnet, convstack, mlp, registry, resnet

    homes = (blocks, convnet, convstack, mlp, registry, resnet)
    for name in networks.__all__:
        owners = [m for m in homes if name in vars(m) and not name.startswith("_")]
        assert owners, name
        assert getattr(networks, name) is getattr(owners[0], name), name
    assert set(networks.__all__) >= {"ConvNet", "get_network", "NORMS", "BasicBlock"}
