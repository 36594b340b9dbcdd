"""The model equivalence checks of test_mos.py on a CUDA GPU, in fp32 and under bf16 autocast (issue 13).
Marked `gpu` and skipped without CUDA, so the CPU suite only reports them as skipped.
Run on a GPU machine: python -m pytest -q -m gpu tests/test_gpu.py (tests/gpu_check.sh does, with more)."""

import random

import pytest
import torch
import torch.nn.functional as F

import mos
from mos import SPACES, SuperTransformer
from test_mos import SRC_V, TGT_V, batch, reversal_batch, trained_reverser

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")
# Relative L2 error allowed between two computations of the same logits. bf16 autocast: 0.4-0.9% measured with CPU
# autocast over 12 subnets of the cpu and iwslt14 spaces (supernet vs fp32, extracted subnet vs supernet), so 3%.
TOL = {"fp32": 1e-5, "bf16": 3e-2}
PRECISIONS = ["fp32", "bf16"]


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in fp32, printed so a failure shows how far off it was."""
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    print(f"relative error {err:.2e}")
    return err


def autocast(precision):
    """bf16 autocast on the test device, or nothing (fp32)."""
    return torch.autocast(DEVICE.type, torch.bfloat16, enabled=precision == "bf16")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("space_name", ["cpu", "iwslt14"])
@pytest.mark.parametrize("router", ["none", "layer", "neuron"])
def test_cuda_subnet_equals_supernet_and_cpu(precision, space_name, router):
    torch.manual_seed(0)
    space = SPACES[space_name]
    model = SuperTransformer(space, SRC_V, TGT_V, num_experts=1 if router == "none" else 2, router=router).eval()
    src, tgt_in = batch()
    archs = [space.largest(), space.smallest()] + [space.sample(random.Random(1)) for _ in range(2)]
    cpu_logits = [model(src, tgt_in, arch) for arch in archs]  # the fp32 CPU reference
    model, src, tgt_in = model.to(DEVICE), src.to(DEVICE), tgt_in.to(DEVICE)
    for arch, reference in zip(archs, cpu_logits):
        extracted = model.subnet(arch)  # in fp32, as every real run extracts (autocast would give bf16 FFN weights)
        assert all(p.dtype == torch.float32 for p in extracted.parameters())
        with torch.inference_mode(), autocast(precision):
            supernet, subnet = model(src, tgt_in, arch), extracted(src, tgt_in)
        assert rel_err(subnet, supernet) <= TOL[precision], f"{arch}: extracted subnet vs supernet path"
        assert rel_err(supernet.cpu(), reference) <= 10 * TOL[precision], f"{arch}: CUDA vs CPU fp32"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cuda_one_expert_mos_is_plain_weight_sharing_and_stateless(precision):
    torch.manual_seed(0)
    space, (src, tgt_in) = SPACES["cpu"], (x.to(DEVICE) for x in batch())
    plain = SuperTransformer(space, SRC_V, TGT_V, num_experts=1, router="none").eval().to(DEVICE)
    arch = space.sample(random.Random(3))
    with torch.inference_mode(), autocast(precision):
        expected = plain(src, tgt_in, arch)
        for router in ["layer", "neuron"]:
            moe = SuperTransformer(space, SRC_V, TGT_V, num_experts=1, router=router).eval().to(DEVICE)
            moe.load_state_dict(plain.state_dict(), strict=False)  # only the routers are new
            assert rel_err(moe(src, tgt_in, arch), expected) <= TOL[precision] / 10
        plain(src, tgt_in, space.largest())  # another subnet in between must not change the next result
        assert rel_err(plain(src, tgt_in, arch), expected) <= TOL[precision] / 10


@pytest.fixture(scope="module")
def reverser():
    """test_mos's tiny reversal Transformer, trained on the CPU, and a test batch."""
    model, g = trained_reverser()
    src, _, tgt_out = reversal_batch(g, B=32)
    return model, src, tgt_out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cuda_beam_search_decodes_like_cpu_and_cache_changes_nothing(reverser, precision):
    model, src, tgt_out = reverser
    cpu_hyps, _ = mos.beam_search(model, src, beam=4)
    model, src = model.to(DEVICE), src.to(DEVICE)
    with autocast(precision):
        hyps, scores = mos.beam_search(model, src, beam=4)
        hyps_nc, scores_nc = mos.beam_search(model, src, beam=4, use_cache=False)
    model.cpu()
    assert hyps == hyps_nc and rel_err(scores, scores_nc) <= TOL[precision]
    assert sum(h == row[:-1].tolist() for h, row in zip(hyps, tgt_out)) >= 30  # still reverses the sequences
    if precision == "fp32":
        assert hyps == cpu_hyps


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cuda_sandwich_steps_reduce_the_loss(precision):
    torch.manual_seed(0)
    space, g, V = SPACES["tiny"], torch.Generator().manual_seed(0), 12
    model = SuperTransformer(space, V, V, num_experts=2, router_hidden=32).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.98))
    src, tgt_in, tgt_out = (x.to(DEVICE) for x in reversal_batch(g, V=V))
    losses = []
    for step in range(60):  # the sandwich rule on one batch: largest, smallest and a random subnet per update
        for arch in [space.largest(), space.smallest(), space.sample(random.Random(step))]:
            with autocast(precision):
                logits = model(src, tgt_in, arch)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten())
            (loss / 3).backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < 0.5 * losses[0], losses[::10]
