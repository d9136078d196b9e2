"""The method, exactly: sigma and its bound, sampling, eq. 17, Algorithm 2, the ablations."""
import math

import pytest
import torch
import torch.nn.functional as F

from vpn_dist.method import (alg2_predict, alg2_scores, bound_sigma, condition, generate_sigma,
                             isotropic_noise, random_pixel_noise, sample_noise, vpn_loss)
from vpn_dist.models import BASE_MODELS, build_base, build_generator

SHAPE = (3, 16, 16)


def batch(n=8, shape=SHAPE, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, k, (n,), generator=g)


def test_condition_adds_gamma_times_label_to_every_pixel():
    x, y = batch()
    x_hat = condition(x, y, 0.002)
    assert torch.allclose(x_hat - x, (0.002 * y.float()).view(-1, 1, 1, 1).expand_as(x), atol=1e-6)


@pytest.mark.parametrize("generator_name", ["dnn3", "resnet18"])
@pytest.mark.parametrize("bound", ["none", "elementwise", "norm"])
def test_sigma_nonnegative_within_bound_and_gradients_reach_generator(generator_name, bound):
    torch.manual_seed(0)
    generator = build_generator(generator_name, SHAPE)
    x, y = batch()
    with torch.no_grad():  # C where the bound cuts some samples (entries) and spares others, whatever the init's scale
        raw = generate_sigma(generator, x, y, 0.002, "none", None)
    C = {"none": None, "elementwise": float(raw.median()), "norm": float(raw.flatten(1).norm(dim=1).median())}[bound]
    sigma = generate_sigma(generator, x, y, 0.002, bound, C)
    assert sigma.shape == x.shape and sigma.dtype == torch.float32
    assert (sigma >= 0).all()
    if bound == "elementwise":
        assert sigma.max() <= C + 1e-6
        assert (sigma < C).any(), "the test needs entries inside the bound for gradients to flow"
    if bound == "norm":
        norms = sigma.flatten(1).norm(dim=1)
        assert (norms <= C + 1e-4).all()
        assert torch.isclose(norms.max(), torch.tensor(C), rtol=1e-4), "the bound should be active here"
        assert (norms < C * 0.999).any(), "and some samples inside it"
    sigma.sum().backward()
    grads = [p.grad for p in generator.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_norm_bound_is_identity_inside_the_ball_and_rescales_outside():
    sigma = torch.tensor([[3.0, 4.0], [0.3, 0.4]]).view(2, 1, 1, 2)
    bounded = bound_sigma(sigma, "norm", 1.0)
    assert torch.allclose(bounded[0].flatten(), torch.tensor([0.6, 0.8]))
    assert torch.equal(bounded[1], sigma[1])


def test_sampled_noise_has_zero_mean_and_std_sigma():
    torch.manual_seed(0)
    sigma = torch.tensor([0.0, 0.1, 0.5, 2.0]).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    eps = sample_noise(sigma, m=2000).view(2000, 4, -1)  # draw-major
    mean, std = eps.mean(dim=(0, 2)), eps.std(dim=(0, 2))
    expected = torch.tensor([0.0, 0.1, 0.5, 2.0])
    # 2000 * 64 draws per sigma: the standard error of the mean is sigma / 358, of the std about sigma / 506
    assert torch.allclose(mean, torch.zeros(4), atol=4 * 2.0 / 358)
    assert torch.allclose(std, expected, rtol=0.01, atol=1e-6)
    assert torch.equal(eps[:, 0], torch.zeros_like(eps[:, 0])), "sigma = 0 must give exactly no noise"


def test_sample_noise_is_reparameterized():
    sigma = torch.full((2, 1, 2, 2), 0.5, requires_grad=True)
    e = torch.randn(3, 2, 1, 2, 2)
    eps = sample_noise(sigma, 3, e)
    assert torch.allclose(eps, (0.5 * e).flatten(0, 1))
    eps.sum().backward()
    assert torch.allclose(sigma.grad, e.sum(0))


def test_vpn_loss_is_mean_cross_entropy_over_n_times_m_draws():
    torch.manual_seed(0)
    n, m, k = 6, 3, 4
    logits = torch.randn(m * n, k)
    y = torch.randint(0, k, (n,))
    direct = 0.0
    for i in range(n):
        for j in range(m):
            direct -= F.log_softmax(logits[j * n + i], dim=0)[y[i]].item()
    assert math.isclose(vpn_loss(logits, y, m).item(), direct / (n * m), rel_tol=1e-6)


@pytest.mark.parametrize("generator_name", ["dnn3", "resnet18"])
def test_batched_alg2_matches_naive_per_class_loop(generator_name):
    torch.manual_seed(0)
    k, gamma = 5, 0.01 / 5
    base, generator = build_base("dnn3", SHAPE, k).eval(), build_generator(generator_name, SHAPE).eval()
    x, _ = batch(n=7, k=k)
    e = torch.randn(7, k, *SHAPE)
    naive = torch.empty(7, k)
    with torch.no_grad():
        for i in range(7):
            for cls in range(k):
                xi, yi = x[i:i + 1], torch.tensor([cls])
                sigma = generate_sigma(generator, xi, yi, gamma, "norm", 3.0)
                naive[i, cls] = base(xi + sigma * e[i, cls]).softmax(dim=1)[0, cls]
    # max_rows=10 forces chunks of 2 samples (10 rows), exercising the chunking too
    batched = alg2_scores(base, generator, x, k, gamma, "norm", 3.0, e=e, max_rows=10)
    assert torch.allclose(batched, naive, atol=1e-6)
    assert torch.equal(alg2_predict(base, generator, x, k, gamma, "norm", 3.0, e=e), naive.argmax(dim=1))


def test_random_ablation_perturbs_exactly_ten_percent_of_pixels():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 20, 20)
    noisy = random_pixel_noise(x, 0.1)
    changed = (noisy != x).any(dim=1)  # per pixel position, over channels
    assert (changed.flatten(1).sum(dim=1) == 40).all()  # 10% of 400 positions, in every image
    assert not torch.equal(changed[0], changed[1]), "positions are drawn per image"
    delta = (noisy - x)[changed.unsqueeze(1).expand_as(x)]
    assert abs(delta.mean()) < 0.1 and abs(delta.std() - 1.0) < 0.1  # N(0, 1)


@pytest.mark.parametrize("name", BASE_MODELS)
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32), (3, 64, 64), (1, 28, 28)])
def test_base_models_take_every_small_input(name, shape):
    if name in ("resnet34", "resnet50") and shape[1] == 64:
        pytest.skip("covered by resnet18 at 64x64; the deeper nets only cost time here")
    net = build_base(name, shape, 7).eval()
    with torch.no_grad():
        assert net(torch.rand(2, *shape)).shape == (2, 7)


def test_resnet_base_uses_the_small_input_stem():
    net = build_base("resnet18", (3, 32, 32), 10)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("name", ["dnn3", "resnet18"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_generators_output_the_input_shape(name, shape):
    with torch.no_grad():
        sigma = build_generator(name, shape).eval()(torch.rand(2, *shape))
    assert sigma.shape == (2, *shape) and (sigma >= 0).all()


def test_any_torchvision_classifier_by_name_and_a_clear_error_when_it_does_not_fit():
    from vpn_dist.errors import UserError

    net = build_base("mobilenet_v3_small", (1, 32, 32), 4).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(UserError, match="does not accept"):
        build_base("vit_b_16", (3, 32, 32), 4)


def test_background_auroc_matches_the_pairwise_definition():
    from vpn_dist.evaluation import background_auroc

    torch.manual_seed(0)
    sigma = torch.rand(3, 6, 6).round(decimals=1)  # ties on purpose
    background = torch.rand(3, 6, 6) < 0.6
    pos, neg = sigma[background], sigma[~background]
    pairwise = ((pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()).mean()
    assert background_auroc(sigma, background) == pytest.approx(float(pairwise), abs=1e-6)
    assert background_auroc(background.float(), background) == 1.0  # all the noise on the background
    assert background_auroc(1 - background.float(), background) == 0.0  # all of it on the object



@pytest.mark.parametrize("generator_name", ["dnn3", "resnet18"])
def test_top_k_alg2_scores_the_base_models_top_classes_and_is_exact_at_k_equal_K(generator_name):
    torch.manual_seed(0)
    k, gamma = 6, 0.3
    base, generator = build_base("dnn3", SHAPE, k).eval(), build_generator(generator_name, SHAPE).eval()
    x, _ = batch(n=9, k=k)
    e = torch.randn(9, k, *SHAPE)
    exact = alg2_scores(base, generator, x, k, gamma, "none", None, e=e)
    assert torch.equal(alg2_scores(base, generator, x, k, gamma, "none", None, e=e, top_k=k), exact)
    assert torch.equal(alg2_predict(base, generator, x, k, gamma, "none", None, e=e, top_k=k),
                       alg2_predict(base, generator, x, k, gamma, "none", None, e=e))
    top = alg2_scores(base, generator, x, k, gamma, "none", None, e=e, top_k=2, max_rows=6)
    with torch.no_grad():
        candidates = base(x).topk(2, dim=1).indices
    scored = torch.isfinite(top)
    assert scored.sum(dim=1).eq(2).all() and scored.gather(1, candidates).all()
    # the scored classes carry exact Algorithm 2's q_Y for the same draws; the others can never win
    assert torch.allclose(top[scored], exact[scored], atol=1e-6)
    best_candidate = exact.gather(1, candidates).argmax(dim=1, keepdim=True)
    assert torch.equal(top.argmax(dim=1), candidates.gather(1, best_candidate)[:, 0])

def test_dnn3_generator_shares_its_first_layer_across_classes_exactly():
    """Algorithm 2's shortcut (the first layer is linear in x + gamma*Y) gives the sigma of the direct path, and
    so the same predictions for the same draws; weights are made large and gamma big so the label matters."""
    torch.manual_seed(0)
    k, gamma = 6, 0.3
    generator = build_generator("dnn3", SHAPE).eval()
    for layer in generator.net:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, 0.0, 0.05)
            torch.nn.init.normal_(layer.bias, 0.0, 0.1)
    base = build_base("dnn3", SHAPE, k).eval()
    x, _ = batch(n=9, k=k)
    x_rows, y_rows = x.repeat_interleave(k, dim=0), torch.arange(k).repeat(9)
    with torch.no_grad():
        direct = generate_sigma(generator, x_rows, y_rows, gamma, "none", None)
        shared = generator.sigma_per_class(x, gamma, torch.arange(k).expand(9, k))
    assert direct.std() > 0.1 and (direct.view(9, k, -1)[:, 0] - direct.view(9, k, -1)[:, -1]).abs().max() > 0.01
    assert torch.allclose(shared, direct, atol=1e-5)
    e = torch.randn(9, k, *SHAPE)
    plain = lambda inputs: generator(inputs)  # noqa: E731 - the same generator without the shortcut
    assert torch.allclose(alg2_scores(base, generator, x, k, gamma, "none", None, e=e, max_rows=12),
                          alg2_scores(base, plain, x, k, gamma, "none", None, e=e), atol=1e-5)
    assert torch.equal(alg2_predict(base, generator, x, k, gamma, "none", None, e=e),
                       alg2_predict(base, plain, x, k, gamma, "none", None, e=e))


def test_isotropic_noise_has_the_asked_scale_on_every_pixel():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16)
    noise = isotropic_noise(x, 0.05) - x
    assert abs(float(noise.mean())) < 2e-3 and abs(float(noise.std()) - 0.05) < 1e-3
    per_pixel = noise.std(dim=0)  # the same scale everywhere: no pixel is spared or favoured
    assert float(per_pixel.min()) > 0.035 and float(per_pixel.max()) < 0.065
    assert torch.equal(isotropic_noise(x, 0.0), x)


class _AbsOfInput(torch.nn.Module):
    """sigma = |x_hat|: the label moves sigma by exactly gamma times the change of class index."""

    def forward(self, x_hat):
        return x_hat.abs()


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_sigma_label_change_measures_what_the_label_alone_moves(gamma):
    from vpn_dist.evaluation import evaluate

    torch.manual_seed(0)
    k = 4
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % k
    metrics = evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, k)), _AbsOfInput(), [(x, y)],
                       num_classes=k, gamma=gamma, bound="none", C=None)
    # next class: +1 step of the index, except the last class, which wraps to 0 (k - 1 steps down)
    steps = torch.where(y == k - 1, k - 1, 1).float()
    expected = float((gamma * steps.view(-1, 1, 1, 1).expand_as(x)).sum() / (x + gamma * y.view(-1, 1, 1, 1)).sum())
    assert metrics["sigma_label_change"] == pytest.approx(expected, rel=1e-5)
    assert (metrics["sigma_label_change"] == 0) == (gamma == 0)
