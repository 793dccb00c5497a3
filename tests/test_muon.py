import pytest
import torch

from model.muon import Muon, ns_cost, orthogonalise, share_work, split_params
from model.segmenter import Segmenter

torch.set_num_threads(1)


def test_orthogonalise_flattens_the_spectrum_and_batches_alike():
    g = torch.Generator().manual_seed(0)
    # a badly conditioned matrix: singular values from 0.1 to 10 (5 iterations lift a 100:1 spread)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    v, _ = torch.linalg.qr(torch.randn(80, 48, generator=g))
    m = u @ torch.diag(torch.logspace(-1, 1, 48)) @ v.T  # (48, 80)
    for x in (m, m.T):  # wide and tall
        sv = torch.linalg.svdvals(orthogonalise(x))
        assert float(sv.min()) > 0.5 and float(sv.max()) < 1.3  # every direction moves at about the same rate
        assert orthogonalise(x).shape == x.shape
    batch = torch.stack([m, 3 * m, torch.randn(48, 80, generator=g)])
    one_by_one = torch.stack([orthogonalise(x) for x in batch])
    assert torch.allclose(orthogonalise(batch), one_by_one, atol=1e-5)
    assert torch.allclose(orthogonalise(batch)[0], orthogonalise(batch)[1], atol=1e-5)  # scale-free


def test_muon_fits_a_linear_map_and_a_conv_kernel():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(16, 32, generator=g)
    lin = torch.nn.Linear(32, 16, bias=False)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    conv_target = torch.randn(8, 3, 3, 3, generator=g)
    opt = Muon([lin.weight, conv.weight], lr=0.5)
    x, img = torch.randn(256, 32, generator=g), torch.randn(8, 3, 12, 12, generator=g)
    first = None
    for step in range(200):
        opt.param_groups[0]["lr"] = 0.5 * (1 - step / 200)  # fixed-size steps need a falling rate to settle
        loss = ((lin(x) - x @ target.T) ** 2).mean() + ((conv(img) - torch.conv2d(img, conv_target, padding=1)) ** 2).mean()
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.02 * first


def test_muon_refuses_vectors_and_split_params_covers_every_parameter_once():
    with pytest.raises(ValueError, match="matrices or conv kernels"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
    net = Segmenter.new("compact", seed=0).net
    matrices, rest = split_params(net)
    ids = [id(p) for p in matrices + rest]
    assert len(ids) == len(set(ids)) == len([p for p in net.parameters() if p.requires_grad])
    assert all(p.dim() >= 2 for p in matrices)
    names = {id(p): n for n, p in net.named_parameters()}
    kept = {names[id(p)] for p in rest}
    assert "mask_decoder.iou_token.weight" in kept and "mask_decoder.mask_tokens.weight" in kept  # tokens: AdamW
    assert "shared_image_embedding.positional_embedding" in kept
    assert not any(n.endswith("q_proj.weight") for n in kept)  # every projection is Muon's


def test_share_work_balances_dearest_first_and_covers_every_shape():
    costs = {(128, 1152): 100, (96, 864): 30, (64, 64): 25, (32, 64): 20, (8, 64): 1}
    owner = share_work(costs, 2)
    assert set(owner) == set(costs) and owner == share_work(dict(reversed(costs.items())), 2)  # order-free
    loads = [sum(c for k, c in costs.items() if owner[k] == w) for w in (0, 1)]
    assert loads == [100, 76]
    assert set(share_work(costs, 1).values()) == {0}
    assert ns_cost((128, 1152), 4) == ns_cost((1152, 128), 4) == 4 * (2 * 128 * 128 * 1152 + 128 ** 3)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 16),
                               torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))


def _muon_steps(net: torch.nn.Module, steps: int = 3) -> list[torch.Tensor]:
    opt = Muon([p for p in net.parameters() if p.dim() >= 2], lr=0.05, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):  # every worker draws the same gradients, as after an all-reduce
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def _split_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    import model.muon as muon

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    done = []  # matrices this worker orthogonalised
    real = muon.orthogonalise
    muon.orthogonalise = lambda g, steps=5: (done.append(len(g)), real(g, steps))[1]
    torch.save({"params": _muon_steps(_net()), "matrices": sum(done)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_workers_split_the_orthogonalisation_and_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    from engine.integrations.labelstudio import free_port

    mp.spawn(_split_worker, args=(free_port(), str(tmp_path / "params")), nprocs=2, join=True)
    alone = _muon_steps(_net())
    done = []
    for rank in (0, 1):
        got = torch.load(tmp_path / f"params.{rank}", weights_only=True)
        # each shape orthogonalised once, on one worker; the other adds zeros: the same bits
        assert all(torch.equal(a, b) for a, b in zip(alone, got["params"]))
        done.append(got["matrices"])
    assert sum(done) == 3 * 4 and min(done) > 0  # 4 matrices a step, 3 steps, split between the two
