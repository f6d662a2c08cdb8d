"""KnowledgeBuffer (cached soft labels) and vaks_mix_topk_, against the float64 reference."""
import json
import math

import pytest
import torch

import kcd_fast
from kcd_fast import reference as R
from kcd_fast.knowledge import KnowledgeBuffer, KnowledgeFileError, topk_readback_torch
from kcd_fast.knowledge_file import HEADER_BYTES, MAGIC
from kcd_fast.ops import vaks_mix_topk_
from helpers import TRITON_DEVICE


def teacher_logits(n, c, seed=0, scale=3.0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("c", [3, 10, 1001])
def test_dense_readback_matches_reference(dtype, atol, c):
    n = 50
    z = teacher_logits(n, c)
    buf = KnowledgeBuffer(n, c, storage="dense", dtype=dtype, temperature=4.0)
    idx = torch.randperm(n)
    buf.write(idx, z[idx])
    q = torch.tensor([7, 3, 7, 49, 0])
    got = buf.read(q)
    ref = R.soft_labels(z[q], 4.0)
    assert got.dtype == torch.float32 and got.shape == (5, c)
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=atol)
    # The logits it hands the losses reproduce the stored probabilities at the same temperature.
    torch.testing.assert_close(torch.softmax(buf.teacher_logits(q) / 4.0, 1).double(), ref, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("c,k", [(10, 1), (10, 10), (100, 5), (1001, 10)])
def test_topk_readback_matches_reference(dtype, atol, c, k):
    n = 40
    z = teacher_logits(n, c, seed=1)
    z[3, : min(4, c)] = 5.0  # exact ties: the lower class wins
    buf = KnowledgeBuffer(n, c, storage="topk", k=k, dtype=dtype, temperature=2.0)
    buf.write(torch.arange(n), z)
    v_ref, c_ref = R.topk_encode(R.soft_labels(z, 2.0), k)
    assert torch.equal(buf.classes.long(), c_ref)
    q = torch.tensor([3, 0, 39, 3])
    ref = R.topk_decode(v_ref[q], c_ref[q], c)
    got = buf.read(q)
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=atol)
    torch.testing.assert_close(got.sum(1).double(), torch.ones(4, dtype=torch.float64), atol=k * atol, rtol=0)


def test_topk_readback_triton_kernel_matches_torch_twin():
    from kcd_fast.kernels.topk_readback import topk_readback_triton

    n, c, k = 30, 37, 5
    buf = KnowledgeBuffer(n, c, storage="topk", k=k, dtype=torch.float16)
    buf.write(torch.arange(n), teacher_logits(n, c, seed=2))
    q = torch.tensor([0, 29, 5, 5], dtype=torch.int32)
    dev = TRITON_DEVICE  # the GPU, or Triton's interpreter on the CPU
    got = topk_readback_triton(buf.values.to(dev), buf.classes.to(dev), q.to(dev), c, buf.filled.to(dev)).cpu()
    torch.testing.assert_close(got, topk_readback_torch(buf.values, buf.classes, q, c, buf.filled))
    # The uniform share is an IEEE division on both sides: bit for bit, over many rows and divisors.
    for c, k, seed in ((13, 3, 9), (1000, 10, 1), (37, 7, 3), (101, 64, 4)):
        buf = KnowledgeBuffer(50, c, storage="topk", k=k, dtype=torch.float16)
        buf.write(torch.arange(50), teacher_logits(50, c, seed=seed))
        q = torch.arange(50)
        got = topk_readback_triton(buf.values.to(dev), buf.classes.to(dev), q.to(dev), c, buf.filled.to(dev)).cpu()
        assert torch.equal(got, topk_readback_torch(buf.values, buf.classes, q, c, buf.filled)), (c, k)


def test_buffer_device_is_the_arrays_device(tmp_path):
    buf = KnowledgeBuffer(4, 3)
    assert buf.device == buf.filled.device == torch.device("cpu")
    buf.write(torch.arange(4), teacher_logits(4, 3, seed=1))
    buf.save(tmp_path / "b.kcdk")
    assert KnowledgeBuffer.load(tmp_path / "b.kcdk").device == torch.device("cpu")


def test_topk_readback_triton_kernel_reads_nothing_for_an_index_out_of_range():
    from kcd_fast.kernels.topk_readback import topk_readback_triton

    buf = KnowledgeBuffer(6, 9, storage="topk", k=3, dtype=torch.float16)
    buf.write(torch.arange(6), teacher_logits(6, 9, seed=5))
    dev = TRITON_DEVICE
    q = torch.tensor([2, 6, -1, 5])
    got = topk_readback_triton(buf.values.to(dev), buf.classes.to(dev), q.to(dev), 9, buf.filled.to(dev)).cpu()
    assert got[[1, 2]].isnan().all() and not got[[0, 3]].isnan().any()
    assert torch.equal(got[[0, 3]], buf.read(torch.tensor([2, 5])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c,k", [(10, 3), (100, 10), (1000, 10), (20, 20)])
def test_topk_mixing_against_dense_reference(dtype, c, k):
    n = 60
    z = teacher_logits(n, c, seed=3, scale=2.0)
    v, cl = R.topk_encode(R.soft_labels(z, 1.0), k)
    values, classes = v.to(dtype).contiguous(), cl.int().contiguous()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    dst, src = perm[:20], perm[20:40]
    eps = torch.linspace(0.0, 0.3, 20)
    ref_v, ref_c = R.vaks_mix_topk(values.double(), classes, dst, src, eps, c)
    vaks_mix_topk_(values, classes, dst, src, eps, c)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    # Compare the distributions the loss will see (ids can swap only between near-equal masses).
    torch.testing.assert_close(R.topk_decode(values, classes, c), R.topk_decode(ref_v, ref_c, c), atol=tol, rtol=tol)
    same_ids = (classes.long() == ref_c).float().mean()
    assert same_ids > 0.97
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[dst] = False
    assert torch.equal(classes[untouched].long(), cl[untouched])


def test_topk_mixing_loses_only_the_tail():
    c, k = 50, 5
    a = torch.zeros(1, c)
    a[0, :5] = torch.tensor([0.5, 0.2, 0.1, 0.05, 0.05])
    a[0, 5:] = 0.1 / 45
    b = torch.zeros(1, c)
    b[0, 10:15] = torch.tensor([0.6, 0.2, 0.1, 0.05, 0.04])
    b[0, :10] = 0.01 / 45
    b[0, 15:] = 0.01 / 45
    dense = torch.cat([a, b]).double()
    v, cl = R.topk_encode(dense, k)
    values, classes = v.float().contiguous(), cl.int().contiguous()
    vaks_mix_topk_(values, classes, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.3]), c)
    mixed = 0.7 * R.topk_decode(v[:1], cl[:1], c) + 0.3 * R.topk_decode(v[1:], cl[1:], c)
    got = R.topk_decode(values[:1], classes[:1], c)
    # The top-k entries are exact; the rest of the mass is kept, but spread uniformly.
    top = torch.sort(-mixed, dim=1, stable=True).indices[0, :k]
    torch.testing.assert_close(got[0, top], mixed[0, top], atol=1e-6, rtol=1e-6)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (got - mixed).abs().max() > 1e-3  # the tail's shape is what truncation loses


def test_dense_buffer_vaks_is_vaks_mix():
    n, c = 30, 7
    buf = KnowledgeBuffer(n, c, storage="dense", dtype=torch.float32)
    buf.write(torch.arange(n), teacher_logits(n, c, seed=5))
    before = buf.probs.clone()
    d, s, e = torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([0.1, 0.2])
    buf.mix_(d, s, e)
    torch.testing.assert_close(buf.probs, R.vaks_mix(before, d, s, e).float())
    torch.testing.assert_close(buf.probs.sum(1), torch.ones(n))


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_save_load_roundtrip_and_refusals(tmp_path, storage):
    n, c = 25, 12
    buf = KnowledgeBuffer(n, c, storage=storage, k=4, dtype=torch.float16, temperature=3.0, teacher="cnn_large")
    buf.write(torch.arange(n), teacher_logits(n, c, seed=6))
    path = tmp_path / "k.kcdk"
    buf.save(path, teacher_hash="abc")
    head = KnowledgeBuffer.read_header(path)
    assert head["num_samples"] == n and head["num_classes"] == c and head["storage"] == storage
    assert head["teacher"] == "cnn_large" and head["teacher_hash"] == "abc" and head["filled"] == n
    back = KnowledgeBuffer.load(path, num_samples=n, num_classes=c, temperature=3.0)
    q = torch.arange(n)
    assert torch.equal(back.read(q), buf.read(q)) and back.fully_filled()
    with pytest.raises(KnowledgeFileError, match=f"{n} samples.*but this run has 26"):
        KnowledgeBuffer.load(path, num_samples=26)
    with pytest.raises(KnowledgeFileError, match=f"{c} classes.*but this run has 10"):
        KnowledgeBuffer.load(path, num_classes=10)
    (tmp_path / "junk.kcdk").write_bytes(b"not a knowledge file")
    with pytest.raises(KnowledgeFileError, match="not a kcd_fast knowledge file"):
        KnowledgeBuffer.load(tmp_path / "junk.kcdk")
    truncated = tmp_path / "short.kcdk"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(KnowledgeFileError, match="truncated"):
        KnowledgeBuffer.load(truncated)


def test_bytes_per_sample_and_refusal_when_it_does_not_fit():
    assert KnowledgeBuffer(4, 1000, storage="dense").bytes_per_sample() == 2001
    assert KnowledgeBuffer(4, 1000, storage="topk", k=10).bytes_per_sample() == 61
    with pytest.raises(MemoryError, match=r"needs .* GiB, more than host memory"):
        KnowledgeBuffer(10**9, 10**5, storage="dense", dtype=torch.float32)
    with pytest.raises(ValueError, match="storage"):
        KnowledgeBuffer(4, 10, storage="sparse")
    with pytest.raises(ValueError, match="k"):
        KnowledgeBuffer(4, 10, storage="topk", k=11)


def test_lazy_fill_equals_one_off_pass_on_unaugmented_data():
    from kcd_fast.data import build_datasets, eval_view
    from kcd_fast.models import build_model

    bundle = build_datasets("digits", train_transform=False)
    torch.manual_seed(0)
    teacher = build_model("cnn_small", 10, 1).eval()
    n = len(bundle.train)
    one_off = KnowledgeBuffer(n, 10, storage="dense", dtype=torch.float32)
    assert one_off.fill(teacher, eval_view(bundle), batch_size=100) == n
    lazy = KnowledgeBuffer(n, 10, storage="dense", dtype=torch.float32)
    cond = kcd_fast.KnowledgeCondenser(n, epochs=2, stage_epochs=1)
    loader = torch.utils.data.DataLoader(kcd_fast.KCDDataset(bundle.train, cond, mix=False), batch_size=64,
                                         sampler=cond.sampler())
    with torch.no_grad():
        for x, y, index in loader:  # the first epoch of training, writing as it goes
            lazy.write(index, teacher(x))
    assert lazy.fully_filled()
    torch.testing.assert_close(lazy.probs, one_off.probs, atol=1e-6, rtol=1e-5)


def test_bad_topk_mix_input():
    values = torch.rand(10, 3)
    classes = torch.zeros(10, 3, dtype=torch.int32)
    with pytest.raises(TypeError, match="classes.*int32"):
        vaks_mix_topk_(values, classes.long(), torch.tensor([0]), torch.tensor([1]), 0.1, 5)
    with pytest.raises(ValueError, match="num_classes"):
        vaks_mix_topk_(values, classes, torch.tensor([0]), torch.tensor([1]), 0.1, 2)
    with pytest.raises(ValueError, match="dst.*src.*share"):
        vaks_mix_topk_(values, classes, torch.tensor([0]), torch.tensor([0]), 0.1, 5)


def _complete_worker(rank, world, init_file, out_dir, storage, poison=False):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    n, c = 23, 9
    z = teacher_logits(n, c, seed=8)
    owner = torch.arange(n) % world
    owner[5] = 1  # a sample both ranks saw (DDP padding): the owner's row counts
    buf = KnowledgeBuffer(n, c, storage=storage, k=4, dtype=torch.float16)
    mine = (torch.arange(n) % world == rank) | (torch.arange(n) == 5)
    idx = mine.nonzero().flatten()
    z_mine = z[idx] + (0.5 if rank == 0 else 0.0) * (idx == 5).float()[:, None]  # rank 0's copy differs
    buf.write(idx, z_mine)
    if poison and rank == 0:  # rank 0's teacher overflowed on CUDA (unchecked there): its copy of row 5 is NaN
        (buf.probs if storage == "dense" else buf.values)[5] = float("nan")
    buf.complete_ranks(owner, rank)
    torch.save(buf.state_dict(), f"{out_dir}/buf{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("poison", [False, True])
@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_ddp_fill_is_completed_by_one_collective(tmp_path, storage, poison):
    torch.multiprocessing.spawn(_complete_worker, args=(2, str(tmp_path / "init"), str(tmp_path), storage, poison),
                                nprocs=2, join=True)
    single = KnowledgeBuffer(23, 9, storage=storage, k=4, dtype=torch.float16)
    single.write(torch.arange(23), teacher_logits(23, 9, seed=8))
    for r in range(2):
        state = torch.load(tmp_path / f"buf{r}.pt")
        got = KnowledgeBuffer(23, 9, storage=storage, k=4, dtype=torch.float16)
        got.load_state_dict(state)
        assert got.fully_filled()
        for a, b in zip(got._arrays(), single._arrays()):
            assert torch.equal(a, b), "every replica must equal one process's fill, bit for bit"


# ---------------------------------------------------------------------------- review fixes


def _saved(tmp_path, storage="topk", n=25, c=12, k=4, dtype=torch.float16, name="k.kcdk", fill=None):
    buf = KnowledgeBuffer(n, c, storage=storage, k=k, dtype=dtype, temperature=3.0, teacher="t")
    idx = torch.arange(n) if fill is None else fill
    buf.write(idx, teacher_logits(n, c, seed=6)[idx])
    path = tmp_path / name
    buf.save(path, teacher_hash="abc")
    return buf, path


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_save_in_small_pieces_writes_the_same_file(tmp_path, monkeypatch, storage):
    """save() copies the arrays out in SAVE_CHUNK_BYTES pieces: pieces that split rows and elements
    (7 bytes) give the very bytes of one piece per array."""
    buf, whole = _saved(tmp_path, storage=storage, name="whole.kcdk", fill=torch.arange(0, 25, 3))
    monkeypatch.setattr("kcd_fast.knowledge_file.SAVE_CHUNK_BYTES", 7)
    buf.save(tmp_path / "pieces.kcdk", teacher_hash="abc")
    assert (tmp_path / "pieces.kcdk").read_bytes() == whole.read_bytes()
    back = KnowledgeBuffer.load(tmp_path / "pieces.kcdk")
    assert all(torch.equal(a, b) for a, b in zip(back._arrays(), buf._arrays()))


def test_load_refuses_storage_k_dtype_and_teacher_hash_mismatches(tmp_path):
    _, path = _saved(tmp_path, storage="topk", k=4)
    cases = [(dict(storage="dense"), "storage 'topk'.*but this run has 'dense'"),
             (dict(k=5), "k 4.*but this run has 5"),
             (dict(dtype=torch.float32), "dtype 'float16'.*but this run has 'float32'"),
             (dict(teacher_hash="def"), "teacher hash 'abc'.*but this run has 'def'")]
    for kwargs, match in cases:
        with pytest.raises(KnowledgeFileError, match=match):
            KnowledgeBuffer.load(path, **kwargs)
    back = KnowledgeBuffer.load(path, storage="topk", k=4, dtype=torch.float16, teacher_hash="abc")
    assert back.k == 4
    KnowledgeBuffer.load(path, teacher_hash="")  # an unknown hash is not checked
    _, dense = _saved(tmp_path, storage="dense", name="d.kcdk")
    KnowledgeBuffer.load(dense, storage="dense", k=10)  # k means nothing for dense storage
    bare = KnowledgeBuffer(3, 4, storage="topk", k=2)
    bare.write(torch.arange(3), teacher_logits(3, 4))
    bare.save(tmp_path / "nohash.kcdk")
    KnowledgeBuffer.load(tmp_path / "nohash.kcdk", teacher_hash="def")  # the file's hash is unknown


def _rewrite_header(path, out, **changes):
    import json
    from kcd_fast.knowledge_file import HEADER_BYTES, MAGIC

    raw = path.read_bytes()
    head = KnowledgeBuffer.read_header(path)
    head.update(changes)
    head = {key: v for key, v in head.items() if v is not _DROP}
    text = json.dumps(head).encode()
    blob = MAGIC + len(text).to_bytes(8, "little") + text
    out.write_bytes(blob + b"\0" * (HEADER_BYTES - len(blob)) + raw[HEADER_BYTES:])
    return out


_DROP = object()


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_corrupt_or_mismatched_files_raise_knowledge_file_error(tmp_path, storage):
    from kcd_fast.knowledge_file import HEADER_BYTES, MAGIC

    _, path = _saved(tmp_path, storage=storage, fill=torch.arange(0, 25, 2))
    raw = path.read_bytes()
    bad = tmp_path / "bad.kcdk"
    variants = {
        "header cut": raw[:100],
        "trailing bytes": raw + b"x" * 10,
        "not json": raw[:16] + b"x" + raw[17:],
        "huge length": raw[:8] + (10**9).to_bytes(8, "little") + raw[16:],
        "not an object": MAGIC + (2).to_bytes(8, "little") + b"[]" + b"\0" * (HEADER_BYTES - 18) + raw[HEADER_BYTES:],
        "bad utf-8": raw[:16] + b"\xff" + raw[17:],
    }
    for what, data in variants.items():
        bad.write_bytes(data)
        with pytest.raises(KnowledgeFileError):
            KnowledgeBuffer.load(bad)
    head_variants = [dict(dtype="float64"), dict(storage="sparse"), dict(k=None), dict(dtype=_DROP),
                     dict(num_samples=24), dict(num_samples=-1), dict(num_samples=10**12), dict(num_classes=True),
                     dict(temperature="4"), dict(temperature=0.0), dict(filled=12), dict(filled=_DROP),
                     dict(k=3) if storage == "topk" else dict(k=11)]
    for change in head_variants:
        with pytest.raises(KnowledgeFileError):
            KnowledgeBuffer.load(_rewrite_header(path, bad, **change))
    mask = bytearray(raw)
    mask[-2] = 7  # a filled byte that is not 0 or 1
    bad.write_bytes(bytes(mask))
    with pytest.raises(KnowledgeFileError, match="filled"):
        KnowledgeBuffer.load(bad)
    mask[-2] = 1  # a well-formed byte, but the header counts one fewer
    bad.write_bytes(bytes(mask))
    with pytest.raises(KnowledgeFileError, match="filled"):
        KnowledgeBuffer.load(bad)
    if storage == "topk":
        for cls_id in (12, -1):
            data = bytearray(raw)
            at = HEADER_BYTES + 25 * 4 * 2 + 4 * 5  # classes[1, 1]
            data[at:at + 4] = cls_id.to_bytes(4, "little", signed=True)
            bad.write_bytes(bytes(data))
            with pytest.raises(KnowledgeFileError, match=r"class.*\[0, 12\)"):
                KnowledgeBuffer.load(bad)


def _mapped_from(t, path):
    """Whether ``t``'s memory lies in a mapping of the file ``path`` (Linux /proc/self/maps)."""
    import os

    ptr, ino = t.data_ptr(), os.stat(path).st_ino
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if len(parts) >= 6 and int(parts[4]) == ino and lo <= ptr < hi:
                return True
    return False


@pytest.mark.parametrize("storage,n,k", [("dense", 25, 4), ("topk", 25, 4), ("topk", 25, 3), ("topk", 7, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_load_maps_the_file_copy_on_write(tmp_path, monkeypatch, storage, n, k, dtype):
    import kcd_fast.knowledge as K

    buf, path = _saved(tmp_path, storage=storage, n=n, c=12, k=k, dtype=dtype)
    on_disk = path.read_bytes()
    monkeypatch.setattr(K, "_host_available", lambda: 0)
    with pytest.raises(MemoryError):
        KnowledgeBuffer(n, 12, storage=storage, k=k, dtype=dtype)
    back = KnowledgeBuffer.load(path)  # no host-memory check: nothing is allocated
    for a, b in zip(back._arrays(), buf._arrays()):
        assert torch.equal(a, b) and a.is_contiguous() and a.data_ptr() % a.element_size() == 0
    first = back._arrays()[0]
    assert _mapped_from(first, path), "the first array must be the file's mapping, not a copy"
    if storage == "topk":  # the classes follow N k values: mapped where aligned, else copied
        aligned = (n * k * first.element_size()) % 4 == 0
        assert _mapped_from(back.classes, path) == aligned
    back.mix_(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0.5, 0.5]))
    assert not torch.equal(back._arrays()[0], buf._arrays()[0])
    assert path.read_bytes() == on_disk, "an in-place mix must not write through to the file"


def test_unfilled_topk_rows_read_back_as_zeros_in_both_paths():
    from kcd_fast.kernels.topk_readback import topk_readback_triton

    n, c, k = 9, 13, 3
    buf = KnowledgeBuffer(n, c, storage="topk", k=k, dtype=torch.float16)
    some = torch.tensor([1, 4, 8])
    buf.write(some, teacher_logits(3, c, seed=9))
    q = torch.tensor([0, 1, 2, 4, 8, 7, 1])
    got = buf.read(q)
    full = KnowledgeBuffer(n, c, storage="topk", k=k, dtype=torch.float16)
    full.write(some, teacher_logits(3, c, seed=9))
    full.filled.fill_(True)
    expected = full.read(q) * buf.filled[q].float()[:, None]
    assert torch.equal(got[[0, 2, 5]], torch.zeros(3, c))
    assert torch.equal(got, expected)
    dev = TRITON_DEVICE
    triton = topk_readback_triton(buf.values.to(dev), buf.classes.to(dev), q.to(dev), c, buf.filled.to(dev)).cpu()
    assert torch.equal(triton, got)
    dense = KnowledgeBuffer(n, c, storage="dense")
    assert torch.equal(dense.read(q), torch.zeros(len(q), c))  # the same as dense storage


def test_fill_materialises_a_generator_once_and_refuses_a_dataset_of_another_length():
    n, c = 30, 5
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    ds = torch.utils.data.TensorDataset(x, torch.zeros(n))
    teacher = torch.nn.Linear(4, c)
    buf = KnowledgeBuffer(n, c, storage="dense", dtype=torch.float32)
    assert buf.fill(teacher, ds, indices=(i for i in range(0, n, 3)), batch_size=4) == 10
    assert torch.equal(buf.filled.nonzero().flatten(), torch.arange(0, n, 3))
    with torch.no_grad():
        torch.testing.assert_close(buf.read(torch.tensor([3])), torch.softmax(teacher(x[3:4]) / 4.0, 1))
    small = KnowledgeBuffer(n - 1, c)
    with pytest.raises(ValueError, match=f"dataset.*{n} samples.*{n - 1}"):
        small.fill(teacher, ds)
    assert not small.filled.any()


def test_state_dict_is_a_snapshot():
    buf = KnowledgeBuffer(6, 5, storage="topk", k=2)
    buf.write(torch.arange(3), teacher_logits(3, 5))
    state = buf.state_dict()
    before = [t.clone() for t in state["arrays"]]
    buf.write(torch.arange(6), teacher_logits(6, 5, seed=1))
    for a, b in zip(state["arrays"], before):
        assert torch.equal(a, b)


def test_topk_mix_refuses_class_ids_out_of_range():
    values = torch.rand(10, 3)
    classes = torch.tensor([0, 1, 2], dtype=torch.int32).repeat(10, 1)
    for row, cls_id in ((2, 9), (1, -7), (2, 5)):
        bad = classes.clone()
        bad[row, 1] = cls_id
        before = [values.clone(), bad.clone()]
        with pytest.raises(ValueError, match=r"classes.*\[0, 5\)"):
            vaks_mix_topk_(values, bad, torch.tensor([1]), torch.tensor([2]), 0.5, 5)
        assert torch.equal(values, before[0]) and torch.equal(bad, before[1])
    bad = classes.clone()
    bad[7, 0] = 99  # a row the pairs do not touch is not read
    vaks_mix_topk_(values, bad, torch.tensor([1]), torch.tensor([2]), 0.5, 5)


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_write_refuses_duplicate_indices(storage):
    buf = KnowledgeBuffer(8, 5, storage=storage, k=2)
    before = [t.clone() for t in buf._arrays()]
    with pytest.raises(ValueError, match="indices.*distinct"):
        buf.write(torch.tensor([1, 3, 1]), teacher_logits(3, 5))
    for a, b in zip(buf._arrays(), before):
        assert torch.equal(a, b)


def test_host_memory_check_uses_mem_available(tmp_path, monkeypatch):
    import os

    import kcd_fast.knowledge as K

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000000 kB\nMemFree:            1024 kB\nMemAvailable:     102400 kB\n")
    monkeypatch.setattr(K, "_MEMINFO", str(meminfo))
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 256 if name == "SC_AVPHYS_PAGES" else real(name))  # MemFree
    KnowledgeBuffer(10_000, 500, storage="dense")  # 10 MB: more than MemFree, less than MemAvailable
    with pytest.raises(MemoryError, match=r"\(0\.1 GiB available\).*storage='topk'"):
        KnowledgeBuffer(100_000, 1000, storage="dense")
    with pytest.raises(MemoryError, match="needs") as info:
        KnowledgeBuffer(2_000_000, 1000, storage="topk", k=64)
    assert "storage='topk'" not in str(info.value)
    meminfo.write_text("MemTotal: 1 kB\n")  # no MemAvailable (a kernel without it): sysconf
    with pytest.raises(MemoryError, match="needs"):
        KnowledgeBuffer(10_000, 500, storage="dense")


def test_topk_mix_ties_go_to_the_lower_class_and_fillers():
    c = 8  # classes; each row keeps k = 3
    values = torch.tensor([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    classes = torch.tensor([[5, 6, 7], [5, 6, 7]], dtype=torch.int32)
    vaks_mix_topk_(values, classes, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5]), c)
    # uniform mass (1 - 0.3) / 5 = 0.14 beats 0.1: the three lowest filler classes win
    assert classes[0].tolist() == [0, 1, 2]
    torch.testing.assert_close(values[0], torch.full((3,), 0.14))


def test_topk_equal_masses_keep_the_lower_class():
    values = torch.tensor([[0.3, 0.3], [0.3, 0.3]])
    classes = torch.tensor([[4, 2], [2, 4]], dtype=torch.int32)
    vaks_mix_topk_(values, classes, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.25]), 10)
    assert classes[0].tolist() == [2, 4]


def test_topk_mix_clamps_a_negative_remainder():
    values = torch.tensor([[0.7, 0.31], [0.5, 0.2]])  # row 0 sums over 1 (as fp16 rounding can make it)
    classes = torch.tensor([[1, 3], [0, 2]], dtype=torch.int32)
    vaks_mix_topk_(values, classes, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5]), 6)
    # src's remainder 0.3 / 4 = 0.075; dst's remainder is clamped to 0
    assert classes[0].tolist() == [1, 0]
    torch.testing.assert_close(values[0], torch.tensor([0.5 * 0.7 + 0.5 * 0.075, 0.5 * 0.5]))


def test_load_refuses_another_temperature(tmp_path):
    _, path = _saved(tmp_path, storage="dense")  # a T = 3 file
    with pytest.raises(KnowledgeFileError, match="3.0 temperature.*but this run has 4.0"):
        KnowledgeBuffer.load(path, temperature=4.0)


def test_header_temperature_must_be_finite(tmp_path):
    _, path = _saved(tmp_path, storage="dense")  # a T = 3 file
    raw = path.read_bytes()
    head = KnowledgeBuffer.read_header(path)
    for bad_t in (math.inf, math.nan):
        head["temperature"] = bad_t
        text = json.dumps(head).encode()
        blob = MAGIC + len(text).to_bytes(8, "little") + text
        (tmp_path / "b.kcdk").write_bytes(blob + b"\0" * (HEADER_BYTES - len(blob)) + raw[HEADER_BYTES:])
        with pytest.raises(KnowledgeFileError, match="temperature"):
            KnowledgeBuffer.load(tmp_path / "b.kcdk")


def test_save_refuses_a_header_over_4k(tmp_path):
    buf = KnowledgeBuffer(3, 4, storage="dense", teacher="x" * 5000)
    with pytest.raises(ValueError, match="header too long"):
        buf.save(tmp_path / "k.kcdk")
    assert not (tmp_path / "k.kcdk").exists()


def test_load_state_dict_refuses_another_buffer():
    a = KnowledgeBuffer(4, 5, storage="dense", temperature=4.0)
    b = KnowledgeBuffer(4, 5, storage="dense", temperature=2.0)
    with pytest.raises(KnowledgeFileError, match="state is for"):
        b.load_state_dict(a.state_dict())


def test_topk_readback_of_a_row_whose_values_sum_over_one():
    buf = KnowledgeBuffer(2, 6, storage="topk", k=2, dtype=torch.float32)
    buf.values[0] = torch.tensor([0.7, 0.31])  # fp16 rounding can push the sum over 1
    buf.classes[0] = torch.tensor([1, 3], dtype=torch.int32)
    buf.filled[0] = True
    row = buf.read(torch.tensor([0]))[0]
    assert (row >= 0).all() and row[[0, 2, 4, 5]].eq(0).all()


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_load_state_dict_checks_every_array_before_writing_any(storage):
    """A refused state leaves the buffer as it was: the arrays are all checked (count, dtype, shape,
    top-k class ids) before the first is copied, and nothing is broadcast or cast."""
    src = KnowledgeBuffer(6, 5, storage=storage, k=3)
    src.write(torch.arange(6), teacher_logits(6, 5))
    good = src.state_dict()
    arrays = good["arrays"]
    last = len(arrays) - 1  # `filled`, after the knowledge arrays
    bad_states = [
        ({**good, "arrays": arrays[:-1]}, f"must hold {len(arrays)} arrays"),
        ({**good, "arrays": {"probs": arrays[0]}}, f"must hold {len(arrays)} arrays"),
        ({**good, "arrays": [*arrays[:last], arrays[last][:3]]}, r"`filled` must be a bool tensor of shape \[6\]"),
        ({**good, "arrays": [arrays[0][:1], *arrays[1:]]}, r"must be a float16 tensor of shape \[6, "),  # broadcast
        ({**good, "arrays": [arrays[0].float(), *arrays[1:]]}, "must be a float16 tensor"),  # cast
        ({**good, "arrays": [*arrays[:last], arrays[last].int()]}, "`filled` must be a bool tensor"),
        ({**good, "arrays": [arrays[0].tolist(), *arrays[1:]]}, "got list"),
        ({"header": good["header"]}, "must be a dict with 'header' and 'arrays'"),
        ([good], "must be a dict with 'header' and 'arrays'"),
    ]
    if storage == "topk":
        classes = arrays[1].clone()
        classes[4, 2] = 5
        bad_states.append(({**good, "arrays": [arrays[0], classes, arrays[2]]}, r"classes.*\[0, 5\)"))
    dst = KnowledgeBuffer(6, 5, storage=storage, k=3)
    dst.write(torch.arange(6), teacher_logits(6, 5, seed=1))
    before = [t.clone() for t in dst._arrays()]
    for state, match in bad_states:
        with pytest.raises(ValueError, match=match):
            dst.load_state_dict(state)
        for a, b in zip(dst._arrays(), before):
            assert torch.equal(a, b), match
    dst.load_state_dict(good)
    for a, b in zip(dst._arrays(), arrays):
        assert torch.equal(a, b)


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_read_checks_its_indices(storage):
    """read and teacher_logits take the indices write takes: float or bool indices are refused, not
    truncated or read as 0/1 rows; out of range is refused on the CPU, naming the argument."""
    buf = KnowledgeBuffer(6, 5, storage=storage, k=3)
    buf.write(torch.arange(6), teacher_logits(6, 5))
    for read in (buf.read, buf.teacher_logits):
        with pytest.raises(TypeError, match="KnowledgeBuffer.read: `indices` must have dtype int32 or int64"):
            read(torch.tensor([1.7]))
        with pytest.raises(TypeError, match="`indices` must have dtype int32 or int64, got bool"):
            read(torch.tensor([True, False, True]))
        with pytest.raises(TypeError, match="`indices` must be a torch.Tensor"):
            read([1, 2])
        with pytest.raises(ValueError, match=r"`indices` must be 1-D"):
            read(torch.tensor([[1]]))
        for bad in (6, -1):
            with pytest.raises(ValueError, match=r"KnowledgeBuffer.read: `indices` must lie in \[0, 6\)"):
                read(torch.tensor([0, bad]))
    torch.testing.assert_close(buf.read(torch.tensor([4, 1], dtype=torch.int32)),
                               buf.read(torch.tensor([4, 1])))


def test_constructor_refuses_what_save_could_not_write_back():
    """A buffer whose header its own load would refuse is refused when it is made."""
    for kwargs, exc, match in [
        (dict(temperature=float("inf")), ValueError, "`temperature` must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "`temperature` must be a finite number > 0"),
        (dict(temperature=0.0), ValueError, "`temperature` must be a finite number > 0"),
        (dict(teacher=None), TypeError, "`teacher` must be a string"),
        (dict(teacher=123), TypeError, "`teacher` must be a string"),
    ]:
        with pytest.raises(exc, match=match):
            KnowledgeBuffer(4, 5, **kwargs)


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_mix_takes_a_number_for_eps_and_names_bad_pairs(storage):
    """mix_ takes eps as the ops do (a tensor, or one number for all pairs); bad pairs get the ops'
    errors, naming the argument, instead of an AttributeError."""
    a = KnowledgeBuffer(6, 5, storage=storage, k=3, dtype=torch.float32)
    a.write(torch.arange(6), teacher_logits(6, 5))
    b = KnowledgeBuffer(6, 5, storage=storage, k=3, dtype=torch.float32)
    b.load_state_dict(a.state_dict())
    k1l, k0 = torch.tensor([0, 1]), torch.tensor([4, 5])
    a.mix_(k1l, k0, 0.3)
    b.mix_(k1l, k0, torch.full((2,), 0.3))
    for x, y in zip(a._arrays(), b._arrays()):
        assert torch.equal(x, y)
    before = [t.clone() for t in a._arrays()]
    op = "vaks_mix_" if storage == "dense" else "vaks_mix_topk_"
    with pytest.raises(TypeError, match=f"{op}: `dst` must be a torch.Tensor, got list"):
        a.mix_([0, 1], k0, 0.3)
    with pytest.raises(ValueError, match=rf"{op}: `eps` must be a finite number in \[0.0, 1.0\], got 1.5"):
        a.mix_(k1l, k0, 1.5)
    for x, y in zip(a._arrays(), before):
        assert torch.equal(x, y)


def test_load_compares_teacher_name_and_samples_and_refuses_a_header_without_samples(tmp_path):
    buf = KnowledgeBuffer(6, 5, teacher="resnet32x4", samples="digits, 6 samples, abc")
    buf.write(torch.arange(6), teacher_logits(6, 5))
    path = tmp_path / "k.kcdk"
    buf.save(path)
    got = KnowledgeBuffer.load(path, teacher="resnet32x4", samples="digits, 6 samples, abc")
    assert got.samples == "digits, 6 samples, abc" and got.header() == buf.header()
    with pytest.raises(KnowledgeFileError, match="samples 'digits, 6 samples, abc', but this run has 'x'; it was "
                                                 "made for another dataset, subset or seed"):
        KnowledgeBuffer.load(path, samples="x")
    with pytest.raises(KnowledgeFileError, match="teacher 'resnet32x4', but this run has 'resnet8x4'"):
        KnowledgeBuffer.load(path, teacher="resnet8x4")
    with pytest.raises(KnowledgeFileError, match="is corrupt: its header has no `samples`"):
        KnowledgeBuffer.load(_rewrite_header(path, tmp_path / "nosamples.kcdk", samples=_DROP))
    with pytest.raises(KnowledgeFileError, match="`samples` = 3, expected a string"):
        KnowledgeBuffer.load(_rewrite_header(path, tmp_path / "bad.kcdk", samples=3))


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_write_refuses_non_float_or_non_finite_logits_and_mix_refuses_unfilled_rows(storage):
    """A NaN or inf teacher row has no soft label, an integer one is not logits, and an unfilled row has
    nothing to mix (it reads back as zeros): refused on the CPU, with the buffer unchanged."""
    buf = KnowledgeBuffer(6, 5, storage=storage, k=3)
    buf.write(torch.arange(4), teacher_logits(4, 5))
    before = [t.clone() for t in buf._arrays()]
    bad = teacher_logits(2, 5)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="`teacher_logits` must be finite"):
        buf.write(torch.tensor([4, 5]), bad)
    with pytest.raises(TypeError, match="`teacher_logits` must have dtype float32 or float16 or bfloat16 or float64"):
        buf.write(torch.tensor([4, 5]), torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"KnowledgeBuffer.mix_: every row of `k1l` and `k0` must be filled"):
        buf.mix_(torch.tensor([0]), torch.tensor([5]), 0.3)  # row 5 was never written
    with pytest.raises(ValueError, match=r"KnowledgeBuffer.mix_: `k0` must lie in \[0, 6\)"):
        buf.mix_(torch.tensor([0]), torch.tensor([6]), 0.3)
    for a, b in zip(buf._arrays(), before):
        assert torch.equal(a, b)
    buf.mix_(torch.tensor([0]), torch.tensor([3]), 0.3)  # both filled: mixed
    assert not torch.equal(buf._arrays()[0][0], before[0][0])
    with pytest.raises(TypeError, match="`num_samples` must be an int, got '3'"):
        KnowledgeBuffer("3", 5)
    with pytest.raises(TypeError, match="`k` must be an int, got 3.0"):
        KnowledgeBuffer(3, 5, k=3.0)
    with pytest.raises(ValueError, match="`num_classes` must be an int >= 1, got 0"):
        KnowledgeBuffer(3, 0)
