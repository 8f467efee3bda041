"""RowSparseAdamW and the sparse-aware clip (common/optim.py) against the obvious version: a dense embedding
gradient, torch's clip_grad_norm_ and torch's fused AdamW."""

import copy
from pathlib import Path

import pytest
import torch
from numerics import U32, assert_within, gamma

from common.optim import RowSparseAdamW, build_adamw, clip_grad_norm_
from common.safestate import load_state, save_state

pytestmark = pytest.mark.numerics

# Steps touch rows the earlier ones did not and skip rows they did (their moments decay without a gradient),
# accumulate two micro batches (an uncoalesced sparse gradient), and leave most rows untouched throughout.
BATCHES = [[[1, 2, 2], [3, 4, 1]], [[10, 11, 12], [10, 13, 14]], [[1, 20, 21], [2, 2, 2]], [[40, 41, 3], [3, 3, 3]]]


def run(sparse: bool, clip: float, weight_decay: float = 0.1, H: int = 32, V: int = 50):
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(V, H), torch.nn.Linear(H, 1)
    model = torch.nn.Sequential(emb, head)
    opt = build_adamw(model, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay,
                      sparse_embedding=emb if sparse else None)
    assert isinstance(opt, RowSparseAdamW) == sparse and emb.sparse == sparse
    norms = []
    for step in BATCHES:
        for ids in step:
            head(emb(torch.tensor([ids]))).pow(2).sum().backward()
        assert emb.weight.grad.is_sparse == sparse
        norms.append(clip_grad_norm_(model.parameters(), clip) if sparse else
                     torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, torch.stack(norms)


@pytest.mark.parametrize("V", [50, 8192])  # 8,192 x 32 fp32 = 1 MiB: moments in common.optim.untouched_zeros
@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_row_sparse_adamw_equals_dense_adamw_exactly(weight_decay, V):
    """Without clipping (the coefficient is exactly 1), the row-sparse step runs the same fused kernel on the same
    numbers, and untouched rows get the same decay multiply, so weights and moments are bitwise equal. H = 32 keeps
    the kernel's vector/tail split the same for a gathered row block as for the whole tensor."""
    dense, dense_opt, _ = run(False, clip=1e9, weight_decay=weight_decay, V=V)
    sparse, sparse_opt, _ = run(True, clip=1e9, weight_decay=weight_decay, V=V)
    for a, b in zip(dense.parameters(), sparse.parameters()):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(dense_opt.state[a][key], sparse_opt.state[b][key]), key
    touched = {i for step in BATCHES for ids in step for i in ids}
    moved = (sparse_opt.state[sparse[0].weight]["exp_avg_sq"] != 0).any(1).nonzero().flatten().tolist()
    assert set(moved) == touched


def test_clip_with_sparse_gradient_equals_dense_clip():
    """With clipping active, the total norm (from the sparse values) and every weight stay within the rounding bound
    of the dense run: the norms sum the same squares in another order, off by at most gamma(n) relative, and the
    clipped gradients carry that relative error into AdamW (its update m / sqrt(v) is scale-free to first order, so
    the weights move by at most lr x 2 gamma(n) per step from this, plus the rounding of the update itself)."""
    dense, _, n_dense = run(False, clip=0.05)
    sparse, _, n_sparse = run(True, clip=0.05)
    assert (n_dense > 0.05).all()  # clipping was active at every step
    n = sum(p.numel() for p in dense.parameters())
    assert_within(n_sparse, n_dense.double(), 2 * gamma(n) * n_dense.double(), "total norm")
    lr, steps = 0.05, len(BATCHES)
    for a, b in zip(dense.parameters(), sparse.parameters()):
        bound = steps * (lr * 2 * gamma(n) + 8 * U32 * (a.detach().abs().double() + lr))
        assert_within(b, a.double(), bound, "weights")


@pytest.mark.parametrize("V", [50, 8192])
def test_row_sparse_adamw_resumes_from_a_dense_checkpoint(V):
    """The state_dict is AdamW's: a RowSparseAdamW loaded from a dense AdamW run's checkpoint continues with the rows
    that have moments as its active rows, equal to the dense run."""
    torch.manual_seed(0)
    dense, dense_opt, _ = run(False, clip=1e9, V=V)
    emb, head = torch.nn.Embedding(V, 32), torch.nn.Linear(32, 1)
    model = torch.nn.Sequential(emb, head)
    model.load_state_dict(dense.state_dict())
    opt = build_adamw(model, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, sparse_embedding=emb)
    opt.load_state_dict(copy.deepcopy(dense_opt.state_dict()))  # its own tensors, as after a checkpoint load
    for ids in ([[5, 1, 2]], [[7, 7, 1]]):  # one more step on both: row 5 and 7 are new, 1 and 2 have moments
        for m, o in ((dense, dense_opt), (model, opt)):
            m(torch.tensor(ids)).pow(2).sum().backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for a, b in zip(dense.parameters(), model.parameters()):
        assert torch.equal(a, b)


def rss_anon_mib() -> float:
    """Anonymous resident memory after handing freed heap pages back (glibc may keep freed temporaries)."""
    from data.tokenizer import trim_heap

    trim_heap()
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("RssAnon")).split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc (Linux)")
def test_moments_of_untouched_rows_take_no_memory(tmp_path):
    """Qwen's 151,936 x 128 embedding: dense AdamW moments are 2 x 74 MiB. After steps that touch 300 rows, and
    after a resume from a dense state_dict, the row-sparse moments hold only the pages of the rows that moved
    (300 rows x 512 B in at most 600 pages of 4 KiB: under 3 MiB each) and still equal dense AdamW's."""
    torch.manual_seed(0)
    V, H = 151_936, 128
    emb = torch.nn.Embedding(V, H)
    opt = build_adamw(emb, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, sparse_embedding=emb)
    ids = torch.randperm(V)[:300].view(3, 100)
    before = rss_anon_mib()
    for step_ids in ids:
        emb(step_ids).pow(2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    grown = rss_anon_mib() - before
    assert grown < 20, f"{grown:.0f} MiB for moments of 300 rows (dense moments: 148 MiB)"
    m = opt.state[emb.weight]["exp_avg"]
    assert set((m != 0).any(1).nonzero().flatten().tolist()) == set(ids.flatten().tolist())

    sd = copy.deepcopy(opt.state_dict())  # dense copies, as a checkpoint load gives
    emb2 = torch.nn.Embedding(V, H)
    emb2.load_state_dict(emb.state_dict())
    opt2 = build_adamw(emb2, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, sparse_embedding=emb2)
    before = rss_anon_mib()
    opt2.load_state_dict(sd)
    del sd
    grown = rss_anon_mib() - before
    assert grown < -100, f"{grown:.0f} MiB: the loaded dense moments were kept (dropping them frees 148 MiB)"
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[emb2.weight][key], opt.state[emb.weight][key]), key
    save_state(tmp_path, opt2.state_dict())  # the checkpoint writer takes the mapped moments as they are
    back = load_state(tmp_path)["state"][0]
    assert all(torch.equal(back[k], opt.state[emb.weight][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_nan_guard_after_a_row_sparse_step_looks_at_the_stepped_rows():
    """After a row-sparse step the per-step NaN guard (common.guard.stepped_tensors) reads only the rows that step
    updated (every row that ever had a gradient) plus the dense parameters whole; the other rows were only scaled by
    1 - lr wd. A NaN in a stepped row is found; one in a row no step touched is left to the full check before a
    checkpoint. With |1 - lr wd| > 1 (a decay that could overflow) the whole embedding is checked."""
    from common.guard import nonfinite_tensors, optimizer_params, stepped_tensors

    model, opt, _ = run(True, clip=1e9)
    emb, head = model[0].weight, model[1]
    touched = sorted({i for step in BATCHES for ids in step for i in ids})
    assert opt.last_rows[emb].tolist() == touched
    stepped = stepped_tensors(opt)
    assert [t.shape for t in stepped] == [(len(touched), 32), head.weight.shape, head.bias.shape]
    assert torch.equal(stepped[0], emb.detach()[touched])
    with torch.no_grad():
        emb[touched[3], 5] = float("nan")
        assert nonfinite_tensors(stepped_tensors(opt)) == 1
        emb[touched[3], 5] = 0.0
        emb[49, 0] = float("inf")  # row 49: no gradient at any step
        assert nonfinite_tensors(stepped_tensors(opt)) == 0 and nonfinite_tensors(optimizer_params(opt)) == 1
    for g in opt.param_groups:
        g["lr"] = 30.0  # lr wd = 3: the decay multiplies by -2
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    assert opt.last_rows == {} and [t.shape for t in stepped_tensors(opt)][0] == emb.shape
